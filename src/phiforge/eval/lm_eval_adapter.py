"""phiforge as an lm-evaluation-harness model: ``--model phiforge --model_args pretrained=PATH``.

Importing this module registers the model. lm-eval (0.4.13) has no plugin entry point for models, so its
own ``lm_eval`` command does not import it; run lm-eval through this module instead, with the same
arguments::

    phiforge-lm-eval --model phiforge --model_args pretrained=PATH --tasks piqa
    python -m phiforge.eval.lm_eval_adapter ...   (the same)

or, from Python, ``import phiforge.eval.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="phiforge")``.
Requests are answered by phiforge's scorer and Engine with HFLM's token handling (scoring.py).
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from phiforge.errors import FormatError
from phiforge.eval.scoring import LanguageModel


@register_model("phiforge")
class PhiForgeLM(TemplateLM):
    """lm-eval's TemplateLM over a phiforge model (HF folder, .gguf file or embedded alias)."""

    def __init__(self, pretrained: str = "smollm2-135m-instruct", dtype: str = "float32", device: str | None = None,
                 max_length: int | None = None, batch_tokens: int = 4096, gen_batch_size: int = 16,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, **_: Any) -> None:
        super().__init__()
        import torch

        from phiforge.io.load import load_pretrained

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's command line defaults to cuda; use what this machine has
        model, tokenizer = load_pretrained(pretrained, dtype=dtype, device=device)
        if tokenizer is None:
            raise FormatError(f"{pretrained}: no tokenizer.json next to the weights")
        self.lm = LanguageModel(model, tokenizer, max_length=max_length and int(max_length),
                                batch_tokens=int(batch_tokens), gen_batch_size=int(gen_batch_size),
                                max_gen_toks=int(max_gen_toks), add_bos_token=_flag(add_bos_token),
                                show_progress=True)
        self.tokenizer = tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.lm.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.lm.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.lm.tok_encode(string, add_special_tokens)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood_tokens([(list(ctx), list(cont)) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return self.lm.generate_until([req.args for req in requests])


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


def main() -> None:
    """lm-eval's command line with phiforge registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
