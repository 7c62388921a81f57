"""The phiforge command end to end on a small real model folder (weights + trained tokenizer)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from phiforge.cli import main
from phiforge.config.model import preset
from phiforge.inference.chat import ChatSession, run_chat
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.checkpoint import save_hf_folder
from phiforge.io.load import load_pretrained
from phiforge.model.transformer import build_model
from phiforge.tokenizers.tokenizer import train_bpe

CORPUS = [open(p, encoding="utf-8").read() for p in sorted(Path(__file__).parents[2].glob("shared/research/*.md"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = train_bpe(CORPUS, vocab_size=320, chat_format="phi3")
    config = preset("tiny-phi3").replace(vocab_size=320, intermediate_size=192, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
    save_hf_folder(randomize_(build_model(config), seed=5), path)
    tokenizer.save(path)
    return path


def test_info_preset_and_folder(capsys, folder: Path) -> None:
    assert main(["info", "phi-1.5"]) == 0
    out = capsys.readouterr().out
    assert "1,418,270,720" in out
    assert re.search(r"KV cache/token bfloat16 +196,608 B", out)  # 2 x 24 layers x 2048 x 2 bytes
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "phi3" and info["sliding_window"] == 47


def test_info_unknown_model_is_a_clear_error(capsys) -> None:
    assert main(["info", "no-such-model"]) == 2
    assert "'no-such-model' is not a preset" in capsys.readouterr().err


def test_generate_prints_the_engine_output(capsys, folder: Path) -> None:
    assert main(["generate", "-m", str(folder), "-p", "The cat", "--mode", "qa", "--max-new-tokens", "12",
                 "--quiet-prompt", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    model, tokenizer = load_pretrained(folder, device="cpu")
    expected = Engine(model, tokenizer).generate(
        [tokenizer.encode("The cat\nAnswer:")],
        SamplingParams(max_new_tokens=12, stop_token_ids=tuple(tokenizer.stop_token_ids), stop_strings=("\n\n",)))
    assert captured.out == expected[0].text
    assert "tokens/s" in captured.err


def test_generate_rejects_unknown_mode(capsys, folder: Path) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "-m", str(folder), "-p", "x", "--mode", "poem"])
    assert "invalid choice: 'poem'" in capsys.readouterr().err


def test_quantize_command_writes_a_loadable_folder(capsys, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8"
    assert main(["quantize", "-m", str(folder), "--bits", "8", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bits"] == 8 and report["modules"] == 9  # 2 layers x 4 linears + lm_head
    model, tokenizer = load_pretrained(out, device="cpu")
    assert tokenizer is not None and model.quantization["bits"] == 8


def test_chat_keeps_history_and_resets(folder: Path) -> None:
    model, tokenizer = load_pretrained(folder, device="cpu", dtype=torch.float32)
    session = ChatSession(Engine(model, tokenizer), SamplingParams(max_new_tokens=8))
    out = io.StringIO()
    run_chat(session, io.StringIO("hello there\nand again\n/reset\nfresh start\n/exit\n"), out)
    text = out.getvalue()
    assert text.count("tokens/s]") == 3 and "(history cleared)" in text
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "fresh start"
    rendered = session.prompt_text()
    assert rendered.startswith("<|user|>\nfresh start<|end|>\n") and rendered.endswith("<|assistant|>\n")


def test_tokenize_and_train_commands(capsys, folder: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS) + "\n", encoding="utf-8")
    assert main(["tokenize", str(docs), "-o", str(tmp_path / "tokens"), "-t", str(folder)]) == 0
    assert (tmp_path / "tokens" / "index.json").exists()
    capsys.readouterr()
    assert main(["train", "tiny", "optim.nope=1"]) == 2
    assert "unknown key 'optim.nope'" in capsys.readouterr().err
