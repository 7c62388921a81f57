"""GGUF export: write with phiforge, read back with phiforge's GGUF loader (and transformers'), same model.

For every format the expected weights are computed independently of the exporter: gguf-py's reference
quantizer applied to each Hugging Face tensor (F16 rounding for rows that are not whole blocks). The
round trip must reproduce those weights exactly and their logits, and stay within the format's error
of the original float model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import randomize_
from gguf import GGMLQuantizationType as Q
from test_gguf_read import spm_vocab, write_gguf  # noqa: F401 - spm_vocab is a fixture
from train.gsm8k_corpus import build_corpus

from phiforge.cli import main as cli_main
from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.checkpoint import hf_state_dict
from phiforge.io.gguf_read import load_gguf, read_gguf_tokenizer
from phiforge.io.gguf_write import GGUFExportError, export_gguf
from phiforge.io.load import load_pretrained
from phiforge.model.transformer import build_model
from phiforge.quant.quantize import quantize_model
from phiforge.tokenizers.tokenizer import train_bpe
from phiforge.train import TrainConfig, train

ARCHS = ["tiny-llama", "tiny-phi", "tiny-phi3", "tiny-phi3-longrope", "tiny-phi4-mini"]
QUANTS = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
# max |logit difference| / max |logit| against the float model, per format (random weights, std 0.15)
FORMAT_ERROR = {"f32": 1e-6, "f16": 1e-2, "q8_0": 0.1, "q4_0": 1.0}
TEXTS = ["The model is a transformer with rotary embeddings.", "def f(x):\n    return x * 2\n",
         "<|user|>\nHello<|end|>\n<|assistant|>\n", "naïve café ✓ 3.14"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    lines = [line for line in Path(__file__).read_text().splitlines() if line.strip()]
    return train_bpe(lines * 5, 320, chat_format="phi3")


def expected_weights(model: torch.nn.Module, quant: str) -> dict[str, torch.Tensor]:
    """Each HF tensor as the format stores it, by gguf-py's reference quantizer (vectors stay float32)."""
    out = {}
    for key, w in hf_state_dict(model).items():
        w = w.detach().float()
        qtype = QUANTS[quant]
        if w.ndim == 1 or qtype == Q.F32:
            out[key] = w.clone()
        elif qtype == Q.F16 or w.shape[-1] % 32:
            out[key] = w.half().float()
        else:
            data = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
            out[key] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(w.shape)
    return out


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_random_models(tmp_path: Path, tokenizer: Any, arch: str, quant: str) -> None:
    model = randomize_(build_model(preset(arch)), seed=1).eval()
    summary = export_gguf(model, tokenizer, tmp_path / "m.gguf", quant=quant)
    assert summary["architecture"] == {"tiny-llama": "llama", "tiny-phi": "phi2"}.get(arch, "phi3")
    loaded, tok = load_gguf(tmp_path / "m.gguf")
    assert _same_architecture(loaded.config, model.config)
    want = expected_weights(model, quant)
    got = hf_state_dict(loaded)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    ids = tokenizer.encode(TEXTS[0] + " " + TEXTS[1])
    ours = logits(loaded, ids)
    torch.testing.assert_close(ours, logits(_with_weights(model, want), ids), atol=2e-5, rtol=1e-5)
    drift = ((ours - logits(model, ids)).abs().max() / logits(model, ids).abs().max()).item()
    assert drift <= FORMAT_ERROR[quant]
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text)
    assert tok.chat_template == tokenizer.chat_template
    assert tok.stop_token_ids == tokenizer.stop_token_ids
    message = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(message, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(message, add_generation_prompt=True)


def _same_architecture(a: Any, b: Any) -> bool:
    fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "partial_rotary_factor", "rope_theta", "max_position_embeddings",
              "sliding_window", "norm", "norm_eps", "tie_word_embeddings", "rope_scaling")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` holding ``weights`` (HF keys), through phiforge's own loader."""
    from phiforge.io.checkpoint import model_from_tensors

    return model_from_tensors(model.config.to_hf_config(), weights.items())


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-phi3"])
def test_transformers_reads_the_file(tmp_path: Path, tokenizer: Any, arch: str) -> None:
    """An independent GGUF reader (transformers follows llama.cpp's names and layouts) gets the same model."""
    model = randomize_(build_model(preset(arch)), seed=2).eval()
    export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits(model, ids), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_tokenizer_round_trip(tmp_path: Path, spm_vocab: dict[str, Any], arch: str) -> None:  # noqa: F811
    """A SentencePiece-style vocabulary (byte fallback) is written as llama.cpp's "llama" tokenizer."""
    meta = {f"{arch}.{k}": v for k, v in dict(context_length=128, embedding_length=64, block_count=1,
                                                  feed_forward_length=128, **{"attention.head_count": 4}).items()}
    source = read_gguf_tokenizer(write_gguf(tmp_path / "spm.gguf", arch, {**meta, **spm_vocab}, {}))
    config = preset(f"tiny-{arch}").replace(vocab_size=source.vocab_size)
    export_gguf(randomize_(build_model(config)), source, tmp_path / "out.gguf", quant="q8_0")
    back = read_gguf_tokenizer(tmp_path / "out.gguf")
    assert back.add_bos_token and back.bos_token == source.bos_token
    for text in ["Hello world", " one leading space", "微软 phi 模型 🙂", "a  b   c\n\nd\t e", "<|user|>\nhi<|end|>"]:
        assert back.encode(text) == source.encode(text), text
        assert back.decode(source.encode(text)) == source.decode(source.encode(text))


# ---- a model trained by phiforge -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-phi pretrained on GSM8K for 20 steps by phiforge.train; its exported Hugging Face folder."""
    corpus = build_corpus(tmp_path_factory.getbasetemp() / "gsm8k-corpus")
    out = tmp_path_factory.mktemp("trained")
    config = TrainConfig.from_toml("tiny", [
        f"data.tokenizer={corpus.tokenizer}", f"data.sources.text.path={corpus.train_tokens}",
        f"run.out_dir={out}", "data.val_fraction=0.0", "log.progress=false", "log.peak_flops=1e11",
        "run.max_steps=20", "batch.global_sequences=8", "batch.micro_batch_size=8", "schedule.warmup_steps=4",
        "log.eval_every=1000", "checkpoint.every=1000"])
    return Path(train(config)["export"])


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_round_trip_trained_model(tmp_path: Path, trained: Path, quant: str) -> None:
    model, tokenizer = load_pretrained(trained, dtype="float32", device="cpu")
    assert cli_main(["export", "-m", str(trained), "--device", "cpu", "--quant", quant,
                     "-o", str(tmp_path / "t.gguf")]) == 0
    loaded, tok = load_gguf(tmp_path / "t.gguf")
    prompt = "Natalia sold clips to 48 of her friends in April, and then she sold half as many"
    ids = tokenizer.encode(prompt)
    assert tok.encode(prompt) == ids
    torch.testing.assert_close(logits(loaded, ids), logits(_with_weights(model, expected_weights(model, quant)), ids),
                               atol=2e-5, rtol=1e-5)
    drift = (logits(loaded, ids) - logits(model, ids)).abs().max() / logits(model, ids).abs().max()
    assert drift <= {"f16": 2e-3, "q8_0": 2e-2}[quant]
    params = SamplingParams(max_new_tokens=16)
    original = Engine(model, tokenizer).generate([ids], params)[0].text
    assert Engine(loaded, tok).generate([ids], params)[0].text == original


@pytest.mark.slow
def test_teacher_round_trip_f32_is_exact(tmp_path: Path, teacher: tuple[Any, Any]) -> None:
    model, tokenizer = teacher
    export_gguf(model, tokenizer, tmp_path / "teacher.gguf", quant="f32")
    loaded, tok = load_gguf(tmp_path / "teacher.gguf")
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == ids
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# ---- what cannot be exported -------------------------------------------------------------------------------------
def test_export_errors(tmp_path: Path, tokenizer: Any) -> None:
    model = build_model(preset("tiny-llama"))
    with pytest.raises(GGUFExportError, match="quant 'q3_k'"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", quant="q3_k")
    big = train_bpe([" ".join(map(str, range(2000)))] * 3, 400)
    with pytest.raises(GGUFExportError, match="400 tokens but the model's embedding only 320"):
        export_gguf(model, big, tmp_path / "x.gguf")
    quantize_model(model, bits=8)
    with pytest.raises(GGUFExportError, match="int8/int4"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
