"""Every ``pllava-fast`` subcommand runs on the tiny model (in-process through cli.main, plus one
real console-script start)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pllava_fast import cli
from pllava_fast.testing import make_clip


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "c.mp4", num_frames=8, height=48, width=64)


def test_every_subcommand_is_registered():
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert names == set(cli.SUBCOMMANDS)


def test_demo(capsys, clip, tiny_dir):
    assert cli.main(["demo", "--video", clip, "--model", tiny_dir, "--max-new-tokens", "3"]) == 0
    assert "answer:" in capsys.readouterr().out


def test_caption(capsys, clip, tiny_dir):
    assert cli.main(["caption", clip, "--model", tiny_dir, "--max-new-tokens", "3",
                     "--pooling", "2,1,1", "--num-frames", "2", "--kv-cache", "int4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{clip}: ")


def test_caption_stream(capsys, clip, tiny_dir):
    assert cli.main(["caption", clip, "--model", tiny_dir, "--max-new-tokens", "5",
                     "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert cli.main(["caption", clip, "--model", tiny_dir, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == streamed.strip()


def test_chat_reads_piped_turns(monkeypatch, capsys, clip, tiny_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What happens?\n\nAnd then?\n/reset\nWhy?\n"))
    assert cli.main(["chat", clip, "--model", tiny_dir, "--max-new-tokens", "3", "--json"]) == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["question"] for t in turns] == ["What happens?", "And then?", "Why?"]
    assert [t["turn"] for t in turns] == [1, 2, 1]  # /reset started over


def test_chat_multi_turn_prompt_keeps_history(clip, tiny_dir):
    from pllava_fast.chat import Chat
    from pllava_fast.pipeline import VideoPipeline

    chat = Chat(VideoPipeline.from_pretrained(tiny_dir), clip)
    first = chat.ask("What happens?", max_new_tokens=3)
    chat.ask("And then?", max_new_tokens=3)
    prompt = chat.conversation.get_prompt()
    assert prompt.count("<image>") == 1 and "What happens?" in prompt and first in prompt
    assert prompt.index("What happens?") < prompt.index("And then?")


def test_bench(capsys, clip, tiny_dir):
    assert cli.main(["bench", "--model", tiny_dir, "--video", clip, "--repeats", "1",
                     "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in result["records"]]
    assert "ttft" in names and "whole pipeline" in names and result["same_tokens"] is True


def test_profile(tmp_path, clip, tiny_dir):
    rc = cli.main(["profile", clip, "--model", tiny_dir, "--out", str(tmp_path / "p"),
                   "--no-plots"])
    assert rc == 0
    assert any(name.endswith(".json") for _, _, files in os.walk(tmp_path / "p") for name in files)


def test_console_script_and_errors(tmp_path, clip):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pllava_fast", "chat", clip, "--model",
                           str(tmp_path / "missing")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "model directory not found" in proc.stderr
    assert cli.main([]) == 2


@pytest.mark.parametrize("sub", ["caption", "demo", "chat", "bench"])
def test_kv_cache_flags_parse_the_same_everywhere(sub):
    from pllava_fast.cli.common import kv_cache_spec

    required = {"caption": ["x.mp4", "--model", "m"], "chat": ["x.mp4", "--model", "m"]}
    parser = cli.build_parser(sub)
    args = parser.parse_args([sub, *required.get(sub, []), "--kv-cache", "int4", "--kv-window",
                              "8", "--kv-group-size", "32", "--kv-key-quant", "channel"])
    assert args.kv_cache == "int4"
    assert kv_cache_spec(args).options() == {"window": 8, "group_size": 32, "key_quant": "channel"}
    plain = parser.parse_args([sub, *required.get(sub, [])])
    assert plain.kv_cache == "model-dtype" and kv_cache_spec(plain).options() == {}


@pytest.mark.parametrize("sub", ["caption", "demo", "chat", "bench"])
@pytest.mark.parametrize("flags,match", [(["--kv-window", "8"], "--kv-window: only with a quantized --kv-cache"),
                                         (["--kv-cache", "int8", "--kv-group-size", "3"],
                                          "--kv-group-size")])
def test_bad_kv_cache_flags_exit_2(sub, flags, match, capsys, clip, tiny_dir):
    inputs = {"caption": [clip, "--model", tiny_dir], "chat": [clip, "--model", tiny_dir],
              "demo": ["--video", clip, "--model", tiny_dir],
              "bench": ["--video", clip, "--model", tiny_dir]}[sub]
    assert cli.main([sub, *inputs, *flags]) == 2
    assert match in capsys.readouterr().err


def test_kv_cache_flags_reach_the_pipeline(monkeypatch, capsys, clip, tiny_dir):
    from pllava_fast.quantized_cache import QuantizedKVCache
    from pllava_fast.pipeline import VideoPipeline

    pipes = []
    load = VideoPipeline.from_pretrained.__func__
    monkeypatch.setattr(VideoPipeline, "from_pretrained", classmethod(
        lambda cls, *a, **kw: pipes.append(load(cls, *a, **kw)) or pipes[-1]))
    assert cli.main(["caption", clip, "--model", tiny_dir, "--max-new-tokens", "3", "--kv-cache",
                     "int8", "--kv-window", "8", "--kv-group-size", "32", "--kv-key-quant",
                     "channel"]) == 0
    assert capsys.readouterr().out.startswith(f"{clip}: ")
    cache = pipes[0].make_cache()
    assert isinstance(cache, QuantizedKVCache)
    assert (cache.bits, cache.window, cache.group_size, cache.key_quant) == (8, 8, 32, "channel")
    assert cli.main(["demo", "--video", clip, "--model", tiny_dir, "--max-new-tokens", "2",
                     "--kv-cache", "int4", "--kv-window", "16"]) == 0
    spec = pipes[1].kv_cache_spec
    assert (spec.kind, spec.options()) == ("int4", {"window": 16})


def test_speed_flags_reach_the_pipeline(monkeypatch, capsys, clip, tiny_dir):
    # --compile, --weights and --kv-cache fp8 as the pipeline gets them, and the same caption
    # greedy tokens with the compiled loop as without it
    pytest.importorskip("torchao")
    from pllava_fast.pipeline import VideoPipeline

    pipes = []
    load = VideoPipeline.from_pretrained.__func__
    monkeypatch.setattr(VideoPipeline, "from_pretrained", classmethod(
        lambda cls, *a, **kw: pipes.append(load(cls, *a, **kw)) or pipes[-1]))
    base = ["caption", clip, "--model", tiny_dir, "--max-new-tokens", "4"]
    assert cli.main(base) == 0
    eager = capsys.readouterr().out
    assert cli.main(base + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert pipes[1].compile and pipes[1].decoder is not None
    assert cli.main(base + ["--kv-cache", "fp8", "--weights", "int4", "--weight-group-size",
                            "32"]) == 0
    pipe = pipes[2]
    assert pipe.kv_cache_spec.fp8 and pipe.dtype == torch.bfloat16
    linear = pipe.model.language_model.model.layers[0].self_attn.q_proj
    assert hasattr(linear.weight, "__tensor_flatten__")  # a torchao tensor subclass


@pytest.mark.parametrize("flags,match", [
    (["--weight-group-size", "32"], "--weight-group-size: only with --weights"),
    (["--weights", "int4", "--weight-group-size", "48"], "--weight-group-size: group_size"),
    (["--weights", "int2"], "invalid choice"),
    (["--compile", "--kv-cache", "int4", "--kv-key-quant", "channel"], "--compile needs"),
])
def test_bad_speed_flags_exit_2(flags, match, capsys, clip, tiny_dir):
    assert cli.main(["caption", clip, "--model", tiny_dir, *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_weights_that_cannot_run_here_fail_before_the_load(monkeypatch, capsys, clip, tiny_dir):
    # the small trial layer fails (no kernel for the layout here): one line, exit 2, no load
    from pllava_fast import weight_quant
    from pllava_fast.pipeline import VideoPipeline

    monkeypatch.setattr(weight_quant, "_trial", lambda *a: "RuntimeError: no kernel here")
    monkeypatch.setattr(VideoPipeline, "from_pretrained", classmethod(
        lambda cls, *a, **kw: pytest.fail("the model loaded")))
    assert cli.main(["caption", clip, "--model", tiny_dir, "--weights", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights int4: ") and "no kernel here" in err
    assert len(err.splitlines()) == 1
