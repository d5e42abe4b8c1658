"""What the test files share: tiny random OPT and LLaMA models, a word-level tokenizer and text
to go with them, and running the command line in-process."""
from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import epts
import epts_scale

WORDS = ("the a model weight sparse dense block layer group mask rank adapter token loss mix "
         "feature prune train deploy elastic low high row column score norm input output text "
         "data batch step").split()


def tiny_model(arch: str, n_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; init std 0.2 so that pruning visibly changes the outputs."""
    torch.manual_seed(seed)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=n_layers, ffn_dim=64,
                        num_attention_heads=4, max_position_embeddings=64,
                        word_embed_proj_dim=32, init_std=0.2, dropout=0.0)
        model = OPTForCausalLM(cfg)
    else:  # LLaMA with grouped-query attention: 4 query heads share 2 key/value heads
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=n_layers,
                          intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def synthetic_text(n_words: int, seed: int = 0) -> str:
    """Text with structure (each word prefers a few successors): a model has something to learn."""
    rng = random.Random(seed)
    succ = {w: rng.sample(WORDS, 3) for w in WORDS}
    w, out = WORDS[0], []
    for _ in range(n_words):
        out.append(w)
        w = rng.choice(succ[w]) if rng.random() < 0.9 else rng.choice(WORDS)
    return " ".join(out)


def save_tiny(arch: str, path: Path) -> Path:
    """A tiny model and a word-level tokenizer in HF format: from_pretrained needs no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<pad>", "</s>"]
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    tiny_model(arch).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """calib.txt, eval.txt and the tiny OPT and LLaMA as model folders."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "calib.txt").write_text(synthetic_text(3000, seed=0))
    (root / "eval.txt").write_text(synthetic_text(1000, seed=1))
    for arch in ("opt", "llama"):
        save_tiny(arch, root / arch)
    return root


def cli(tiny_dir, arch, *extra) -> list[str]:
    """The flags of a tiny run on the CPU: 4 calibration windows of 32 tokens, quiet."""
    return ["--model", str(tiny_dir / arch), "--calib", str(tiny_dir / "calib.txt"), "--eval",
            str(tiny_dir / "eval.txt"), "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
            "--quiet", *[str(e) for e in extra]]


def run_cli(*args) -> tuple[int, str, str]:
    """main() in-process with stdout/stderr captured: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = epts.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, message: str) -> None:
    """Status 2 and one line on stderr (warnings aside), 'error: ...' holding `message`."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error:") and message in lines[0], err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from more, and on a busy machine several
    threads wait on each other far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_work(monkeypatch) -> None:
    """Fail the test if any optimization, pruning or calibration starts: refusals come first."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")
    for name in ("optimize", "prune_sequential", "prune_magnitude", "calibration_windows"):
        monkeypatch.setattr(epts, name, boom)
    monkeypatch.setattr(epts_scale, "optimize", boom)
