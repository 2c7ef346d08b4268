"""The train / eval / build-embedded subcommands parse, document themselves, and run end to end."""
import json
import os
import subprocess
import sys

import pytest

from phi3v_spatial import cli


@pytest.mark.parametrize("command, must_mention", [
    ("train", ["--base", "--data", "--out", "--full", "--rank", "--targets", "--vision-lora", "--grad-accum",
               "--save-every", "--resume"]),
    ("eval", ["--model", "--adapter", "--data", "--out", "--limit"]),
    ("build-embedded", ["--out", "--work", "--stages"]),
])
def test_help(command, must_mention):
    out = subprocess.run([sys.executable, "-m", "phi3v_spatial.cli", command, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in must_mention:
        assert flag in out.stdout, (flag, out.stdout)


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    from phi3v_spatial.data.records import read_jsonl
    from phi3v_spatial.data.synth import generate_dataset
    from phi3v_spatial.engine import prompts
    from phi3v_spatial.model.tiny import save_random_checkpoint
    from phi3v_spatial.train.tokenizer_training import train_tokenizer

    data_dir = str(tmp_path / "synth")
    path = generate_dataset(data_dir, 3, seed=5, size=(64, 48), kinds=["yesno", "choice", "count"])
    texts = [prompts.chat_prompt(r.question, 1) + prompts.answer_target(r.answer) for r in read_jsonl(path)]
    base = save_random_checkpoint(str(tmp_path / "base"), train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300),
                                  num_crops=1)
    adapter = str(tmp_path / "adapter")
    assert cli.main(["train", "--base", base, "--data", f"synth:{data_dir}:2", "--out", adapter, "--steps", "2",
                     "--batch-size", "2", "--grad-accum", "1", "--rank", "4", "--no-progress", "--device", "cpu"]) == 0
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
    report_path = str(tmp_path / "report.json")
    assert cli.main(["eval", "--model", base, "--adapter", adapter, "--data", f"synth:{data_dir}", "--out", report_path,
                     "--limit", "8", "--no-progress", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "by type" in printed
    report = json.load(open(report_path))
    assert report["report"]["overall"]["n"] == 8 == len(report["predictions"])
    assert report["adapter"] == adapter
