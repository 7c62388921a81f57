"""Generation equals transformers' greedy output token for token; batching, sampling and stops behave."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import randomize_

from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.checkpoint import save_hf_folder
from phiforge.model.transformer import build_model
from phiforge.tokenizers.tokenizer import train_bpe

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 60)), [300, 2, 17]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple]:
    out = {}
    for name in ("tiny-phi", "tiny-phi3", "tiny-phi3-longrope", "tiny-llama"):
        ours = randomize_(build_model(preset(name)), seed=3).eval()
        folder = tmp_path_factory.mktemp(name)
        save_hf_folder(ours, folder)
        out[name] = ours, transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return out


@pytest.mark.parametrize("name", ["tiny-phi", "tiny-phi3", "tiny-phi3-longrope", "tiny-llama"])
def test_greedy_equals_transformers_generate(models, name: str) -> None:
    """64 new tokens; the 50-token prompt crosses tiny-phi3's window (47) and the LongRoPE switch (64)."""
    ours, hf = models[name]
    results = Engine(ours, max_batch_size=2).generate(PROMPTS, SamplingParams(max_new_tokens=64))
    for prompt, result in zip(PROMPTS, results, strict=True):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == want
        assert result.finish_reason == "length"


def test_batched_equals_unbatched_for_greedy_and_sampling(models) -> None:
    ours, _ = models["tiny-phi3-longrope"]
    params = [SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=70, temperature=0.8, top_k=50, seed=1),
              SamplingParams(max_new_tokens=25, temperature=1.2, top_p=0.9, min_p=0.05, seed=2,
                             repetition_penalty=1.3)]
    together = Engine(ours, max_batch_size=2).generate(PROMPTS, params)  # 3 prompts, 2 rows: a row is reused
    alone = [Engine(ours, max_batch_size=1).generate([p], [s])[0] for p, s in zip(PROMPTS, params, strict=True)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [40, 70, 25]


def test_seeded_sampling_is_reproducible_and_seed_sensitive(models) -> None:
    ours, _ = models["tiny-llama"]
    engine = Engine(ours)

    def run(seed: int) -> list[int]:
        return engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed))[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_filters_restrict_the_support(models) -> None:
    ours, _ = models["tiny-llama"]
    engine = Engine(ours)
    with torch.no_grad():
        top = ours(torch.tensor([PROMPTS[0]]))[0, -1].topk(3).indices.tolist()
    for seed in range(20):
        first = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3, seed=seed))
        assert first[0].token_ids[0] in top


def test_stop_token_ids_and_stop_strings(models) -> None:
    ours, _ = models["tiny-phi"]
    tokenizer = train_bpe([" ".join(f"word{i}" for i in range(200))] * 3, vocab_size=320)
    engine = Engine(ours, tokenizer)
    free = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30))[0]
    stop_id = free.token_ids[10]
    stopped = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30, stop_token_ids=(stop_id,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    stop_text = tokenizer.decode(free.token_ids[12:14])
    by_string = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30, stop_strings=(stop_text,)))[0]
    assert by_string.finish_reason == "stop"
    assert stop_text not in by_string.text
    assert tokenizer.decode(free.token_ids).startswith(by_string.text)


def test_stream_yields_the_same_text(models) -> None:
    ours, _ = models["tiny-phi"]
    tokenizer = train_bpe([" ".join(f"word{i}" for i in range(200))] * 3, vocab_size=320)
    engine = Engine(ours, tokenizer)
    params = SamplingParams(max_new_tokens=20)
    pieces = list(engine.stream(PROMPTS[0], params))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate([PROMPTS[0]], params)[0].text


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
])
def test_bad_sampling_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(models) -> None:
    ours, _ = models["tiny-phi"]  # context 2048
    with pytest.raises(ValueError, match="prompt 0: 2040 tokens \\+ max_new_tokens 10 exceed the context of 2048"):
        Engine(ours).generate([[1] * 2040], SamplingParams(max_new_tokens=10))




def test_teacher_greedy_equals_transformers_generate(teacher, ref_model) -> None:
    """The embedded SmolLM2 teacher: 64 greedy tokens, fp32, token for token."""
    model, tokenizer = teacher
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Explain photosynthesis in two sentences."}],
                                         add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    ours = Engine(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=64))[0]
    want = ref_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.token_ids == want
    assert tokenizer.decode(ours.token_ids).lower().startswith("photosynthesis")


def test_serve_admits_requests_arriving_mid_run(models) -> None:
    """Engine.serve: a request that arrives while others decode joins the batch; outputs equal generate's."""
    ours, _ = models["tiny-phi3-longrope"]
    params = [SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=70, temperature=0.8, seed=1),
              SamplingParams(max_new_tokens=25, temperature=1.2, top_p=0.9, seed=2)]
    want = Engine(ours, max_batch_size=1).generate(PROMPTS, params)
    results = [want[0].__class__(len(p)) for p in PROMPTS]
    calls = {"n": 0}

    def take(idle: bool):  # noqa: ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            return [(0, PROMPTS[0], params[0], results[0])]
        if calls["n"] == 10:  # two more arrive after nine decode steps
            return [(1, PROMPTS[1], params[1], results[1]), (2, PROMPTS[2], params[2], results[2])]
        return None if calls["n"] > 10 else []

    keys = [key for key, _ in Engine(ours, max_batch_size=2, max_seq_len=256).serve(take)]
    assert [r.token_ids for r in results] == [w.token_ids for w in want]
    assert keys.index(1) > 8 and keys.count(0) == 40 and all(r.finish_reason == "length" for r in results)


def test_logprobs_of_the_chosen_tokens(models) -> None:
    ours, _ = models["tiny-llama"]
    result = Engine(ours).generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, logprobs=3))[0]
    assert len(result.logprobs) == 5
    with torch.no_grad():
        logits = ours(torch.tensor([PROMPTS[0] + result.token_ids]))[0, len(PROMPTS[0]) - 1:-1].float()
    expected = torch.log_softmax(logits, -1)
    for step, (token, (lp, top)) in enumerate(zip(result.token_ids, result.logprobs)):
        assert abs(lp - expected[step, token].item()) < 1e-4
        assert [t for t, _ in top] == expected[step].topk(3).indices.tolist() and top[0][0] == token
