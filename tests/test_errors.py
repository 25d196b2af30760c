"""Every user error: one clear line, before any model loads, and nothing lost (issue 11).

CLI calls run in-process through ``cli.main`` (fast: torch is already imported) except where a
real process is the point: exit codes and tracebacks of the console script, argv bytes, SIGINT,
a lock held by another process. The Python API and the ops get the same bad arguments.
"""
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

from pllava_fast import cli, dataset, jsonio, ops, preflight
from pllava_fast.cli import common
from pllava_fast.testing import make_clip

ENV = dict(os.environ, OMP_NUM_THREADS="1")
ENV.pop("PLLAVA_FAST_DEBUG", None)


@pytest.fixture(scope="module")
def m(tmp_path_factory, tiny_model_dir):
    """The files the cases point at (``{clip}``-style placeholders in the tables below)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("errors")
    p = {name: root / name for name in ("random.mp4", "empty", "loop.mp4", "img.png", "afile",
                                        "empty.txt", "nan.txt", "bin.txt", "out")}
    p["random.mp4"].write_bytes(os.urandom(4096))
    p["empty"].mkdir(), p["out"].mkdir(), os.symlink(p["loop.mp4"], p["loop.mp4"])
    Image.new("RGB", (64, 48), "red").save(p["img.png"])
    p["afile"].write_text("x"), p["empty.txt"].write_text("# nothing\n\n")
    clip = make_clip(root / "c.mp4", num_frames=8, height=48, width=64)
    p["nan.txt"].write_text(f'{{"video": "{clip}", "start": NaN}}\n')
    p["bin.txt"].write_bytes(b"\xff\xfe\x00abc\n")
    names = dict(random="random.mp4", emptydir="empty", loop="loop.mp4", image="img.png",
                 file="afile", empty_list="empty.txt", nan_list="nan.txt", bin_list="bin.txt")
    return dict({k: str(p[v]) for k, v in names.items()}, model=str(tiny_model_dir), clip=clip,
                hd=make_clip(root / "hd.mp4", num_frames=2, height=1080, width=1920),
                out=str(p["out"]), root=str(root))


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def memory_16g(monkeypatch):
    """The memory estimates against a fixed 16 GiB, whatever this machine has free."""
    monkeypatch.setattr(preflight, "available_memory", lambda: 16 * 2**30)


# -- bad CLI calls, in-process: "argv | words the one error line must hold", ";" between calls,
# placeholders from the fixture m, C = caption {clip} --model {model}, O = --output {out}/o.jsonl
BAD_CALLS = [[part.strip() for part in case.split("|")] for line in """
caption {hd} --model {model} --num-frames 100000 | 100000 frames
C --pooling 1000,1000,1000 | 1000000000 visual ; C --prompt {long} | max_position_embeddings 4096
C --start nan | --start ; C --start inf | --start ; C --start 2 --end 1 | --end
C --start 1000 | past the end ; C --num-frames 0 | --num-frames ; C --num-frames -3 | --num-frames
C --num-frames 2.5 | invalid int value ; C --dtype int7 | --dtype ; C --device meta | --device
C --device foo | --device ; C --device cuda:7 | --device ; C --workers -1 | --workers
C --workers 100000 | --workers ; C --batch-size 0 | --batch-size
C --max-new-tokens 0 | --max-new-tokens ; C --max-new-tokens 100000 | 100000 new tokens
C --kv-cache int8 --kv-window -1 | --kv-window ; C --kv-window 8 | only with a quantized --kv-cache
C --kv-cache int8 --kv-group-size 3 | --kv-group-size ; C --pooling 2.5,2,2 | --pooling
C --weight-group-size 64 | only with --weights ; C --weights int4 --weight-group-size 7 | group_size
C --kv-cache fp8 --kv-key-quant channel | per token group ; C --weights fp4 | invalid choice
C --compile --kv-cache int8 --kv-key-quant channel | --compile needs
C --pooling 0,1,1 | --pooling ; C --prompt {two_images} | exactly one
C --output {emptydir} | is a folder ; C --output {root}/nope/o.jsonl | does not exist
C --output /dev/null | not a regular file ; caption {clip} --model {file} | is a file
caption {clip} --model {emptydir} | no config.json ; caption {loop} --model {model} | link loop
caption {emptydir} --model {model} | no image frames
caption {random} --model {model} | not a readable video
caption --input {empty_list} --model {model} O | lists no videos
caption --input {nan_list} --model {model} O | nan.txt:1
caption --input {bin_list} --model {model} O | bin.txt is not a UTF-8
caption --input /dev/null --model {model} O | neither a folder
demo --video {random} | random.mp4: not a readable video ; demo --question {two_images} | one
demo --video {hd} --num-frames 100000 | 100000 frames ; demo --max-new-tokens 100000 | context
demo --question {long} | at least 200 ; bench --max-new-tokens 100000 | context
bench --batch-size 100000 | 100000 video(s) ; bench --num-frames 100000 | 100000 frames
chat {clip} --model {model} --template nope | unknown template
chat {clip} --model {model} --start 1000 | past the end
chat {clip} --model {model} --max-new-tokens 5000 | context
profile {clip} --out {root}/p --k nan | --k ; profile {clip} --out {root}/p --k 0 | --k
profile {clip} --out {root}/p --k inf | --k ; profile {clip} --out {root}/p --top -1 | --top
profile {clip} --out {file} | not a directory ; profile {loop} --out {root}/p | link loop
profile {hd} --out {root}/p --num-frames 100000 | 100000 frames
bench --repeats 0 | --repeats ; bench --budget-gb inf | --budget-gb
bench --budget-gb -1 | --budget-gb ; bench --batch-size 0 | --batch-size
bench --video {image} | not an image ; bench --shape 7b --device cpu | parameters
bench --model {model} --max-new-tokens 100000 | context
make-tiny {root}/t --pooling 1000,1000,1000 | 4096-token context
make-tiny {root}/t --seed 1180591620717411303424 | --seed ; make-tiny {file} | not an empty
frob | invalid choice ;  | a command is required
""".strip().splitlines() for case in line.split(" ; ")]
if not torch.cuda.is_available():
    BAD_CALLS += [["C --device cuda", "no CUDA GPU"], ["demo --device cuda", "no CUDA GPU"]]
CAP = ["caption", "{clip}", "--model", "{model}"]
LONG_PROMPT = "word " * 20000  # 100 KB, 60k tokens against the tiny model's 4096 positions


def _argv(template, m):
    words = dict(m, long=LONG_PROMPT, two_images="<image> and <image>")
    short = {"C": CAP, "O": ["--output", "{out}/o.jsonl"]}
    args = template.split() if isinstance(template, str) else template
    return [a.format(**words) for arg in args for a in short.get(arg, [arg])]


@pytest.mark.parametrize("argv,words", BAD_CALLS, ids=[a[:60] for a, _ in BAD_CALLS])
def test_bad_call_is_one_line_exit_2(argv, words, m, capsys, memory_16g):
    assert cli.main(_argv(argv, m)) == common.EXIT_USAGE
    captured = capsys.readouterr()
    assert words in _one_error(captured.err) and not captured.out


@pytest.mark.parametrize("env,words", [({"RANK": "abc"}, "RANK"), ({"WORLD_SIZE": "1.5"}, "WORLD"),
                                       ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5"),
                                       ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
                                       ({"LOCAL_RANK": "x"}, "LOCAL_RANK")])
def test_bad_torchrun_environment(env, words, m, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(_argv(CAP + ["--output", "{out}/o.jsonl"], m)) == common.EXIT_USAGE
    assert words in _one_error(capsys.readouterr().err)


def test_bad_checkpoints_name_the_file(m, tmp_path, capsys):
    def config(**change):
        return "config.json", lambda text: json.dumps({**json.loads(text), **change})

    vision = json.loads(open(os.path.join(m["model"], "config.json")).read())["vision_config"]
    cases = [(("config.json", lambda _: "{oops"), "invalid JSON"),
             (("config.json", lambda _: "[1, 2]"), "expected a JSON object"),
             (config(num_frames=0), "num_frames"), (config(vision_config=[]), "JSON objects"),
             (config(vision_config=dict(vision, patch_size=0)), "patch_size"),
             (config(pooling_shape=[2.5, 2, 2]), "pooling_shape"),
             (("model.safetensors", lambda t: t[:4096]), "truncated"),
             (("model.safetensors", lambda _: "\x10" + "\x00" * 7 + "[1,2,3,4,5,6]" + " " * 64),
              "not a safetensors"), (("tokenizer.json", lambda _: "{}"), "tokenizer.json"),
             (("model.safetensors.index.json", lambda _: '{"weight_map": {"a": "b.safetensors"}}'),
              "absent")]
    for i, ((name, edit), words) in enumerate(cases):
        path = tmp_path / str(i)
        shutil.copytree(m["model"], path)
        old = (path / name).read_bytes().decode("latin-1") if (path / name).exists() else ""
        (path / name).write_bytes(edit(old).encode("latin-1"))
        assert cli.main(["caption", m["clip"], "--model", str(path)]) == common.EXIT_USAGE
        line = _one_error(capsys.readouterr().err)
        assert words in line and str(path) in line, line


def test_tiny_shape_of_the_checks_is_the_tiny_models(tiny_model_dir):
    info = preflight.checkpoint(tiny_model_dir)  # testing.save_tiny_pllava's defaults
    assert {k: getattr(info, k) for k in common.TINY} == common.TINY


# -- through a real process: exit codes, tracebacks, argv bytes, signals, locks -------------------
def _proc(argv, m, **kw):
    return subprocess.run([sys.executable, "-m", "pllava_fast", *argv], capture_output=True,
                          env=kw.pop("env", ENV), timeout=120, **kw)


REPORTED = [  # the calls users reported, as they typed them
    "caption {hd} --model {model} --num-frames 100000", " ".join(CAP) + " --pooling 1000,1000,1000",
    " ".join(CAP) + " --prompt {long}", " ".join(CAP) + " --start nan --json",
    "demo --video {random}", "caption {loop} --model {model}", " ".join(CAP) + " --num-frames abc",
]


@pytest.mark.parametrize("argv", REPORTED, ids=[a[:50] for a in REPORTED])
def test_reported_calls_in_a_process(argv, m):
    t0 = time.monotonic()
    proc = _proc(_argv(argv, m), m)
    assert proc.returncode == common.EXIT_USAGE and not proc.stdout
    _one_error(proc.stderr.decode())
    assert time.monotonic() - t0 < 60  # no model loaded, nothing decoded


def test_prompt_bytes_that_are_not_utf8(m):
    bad = os.fsencode(m["clip"]), b"--prompt", b"what \xff\xfe is this"
    proc = _proc([b"caption", bad[0], b"--model", os.fsencode(m["model"]), *bad[1:]], m)
    assert proc.returncode == 2
    assert "--prompt is not valid UTF-8" in _one_error(proc.stderr.decode())


def test_traceback_only_with_debug(m):
    proc = _proc(_argv("caption {loop} --model {model}", m), m, env=dict(ENV, PLLAVA_FAST_DEBUG="1"))
    assert proc.returncode == 2 and b"Traceback" in proc.stderr
    assert proc.stderr.decode().strip().splitlines()[-1].startswith("error: ")


def test_second_run_on_a_locked_output_stops_at_once(m, tmp_path):
    out = str(tmp_path / "captions.jsonl")
    holder = dataset.RowWriter(dataset.part_path(out, 0))  # another run, in this process
    try:
        proc = _proc(_argv(CAP + ["--output", out], m), m)
    finally:
        holder.close()
    assert proc.returncode == 2
    assert "is locked by another caption run" in proc.stderr.decode().splitlines()[-1]
    assert "Traceback" not in proc.stderr.decode()


def test_part_file_on_a_device_is_refused_not_read_forever(m, tmp_path):
    out = str(tmp_path / "captions.jsonl")
    os.symlink("/dev/zero", dataset.part_path(out, 0))
    proc = _proc(_argv(CAP + ["--output", out], m), m)
    assert proc.returncode == 2 and "not a regular file" in _one_error(proc.stderr.decode())


def test_sigint_during_model_load_is_one_line_and_130(m, tmp_path):
    out = str(tmp_path / "captions.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "pllava_fast", *_argv(CAP, m), "--output", out,
                             "--workers", "0", "--max-new-tokens", "2"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(dataset.part_path(out, 0)) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)  # the part file is opened just before the model loads
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    if "interrupted" in err.splitlines():
        assert proc.returncode == common.EXIT_INTERRUPTED
        assert not [line for line in err.splitlines() if line.startswith("error")]
    else:  # it finished first (a signal during interpreter exit kills it with SIGINT)
        assert proc.returncode in (0, -signal.SIGINT) and "merged 1 rows" in err


# -- runs that must not lose anything ------------------------------------------------------------
def test_duplicates_are_captioned_or_noted(m, tmp_path, capsys):
    argv = ["caption", m["clip"], m["clip"], "--model", m["model"], "--max-new-tokens", "2",
            "--json"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video"] for r in rows] == [m["clip"]] * 2
    out = str(tmp_path / "o.jsonl")
    assert cli.main(argv + ["--output", out]) == 0
    assert "note: 1 duplicate input(s) skipped" in capsys.readouterr().err
    assert len(dataset.read_rows(out)) == 1


def test_json_never_holds_nan(m, capsys):
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert json.loads(jsonio.dumps({"a": math.nan, "b": [math.inf], "c": torch.tensor(-math.inf)}),
                      **strict) == {"a": None, "b": [None], "c": None}
    assert cli.main(["caption", m["clip"], "--model", m["model"], "--json", "--start", "0.25",
                     "--max-new-tokens", "2"]) == 0
    row = json.loads(capsys.readouterr().out, **strict)
    assert row["ok"] and row["start"] == 0.25


def test_disk_full_ends_with_one_line_naming_the_file(m, tmp_path, capsys, monkeypatch):
    init = dataset.RowWriter.__init__

    def full_disk(self, path):  # the part file opens, then every write finds the disk full
        init(self, path)
        self.file.close()
        self.file = mock.Mock(closed=False, write=mock.Mock(
            side_effect=OSError(errno.ENOSPC, "No space left on device")))

    monkeypatch.setattr(dataset.RowWriter, "__init__", full_disk)
    out = str(tmp_path / "o.jsonl")
    assert cli.main(_argv(CAP, m) + ["--output", out, "--workers", "0",
                                     "--max-new-tokens", "2"]) == common.EXIT_RUN_FAILED
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert line == [f"error: {dataset.part_path(out, 0)}: cannot write a row (No space left on "
                    "device)"], err


def test_bench_capacity_line_says_estimate_and_shape(m, capsys):
    assert cli.main(["bench", "--model", m["model"], "--video", m["clip"], "--repeats", "1",
                     "--max-new-tokens", "2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("videos per batch"))
    assert "an estimate for this model" in line and "pooling (4, 2, 2)" in line
    assert "not a measurement" in line


# -- the Python API and the ops: "call | words of its ValueError / TypeError", ";" between calls --
API_CALLS = """
pool((2.5, 2, 2)) | pooling_shape ; pool((True, 2, 2)) | pooling_shape ; pool(num=True) | num_frames
pool((1000, 1000, 1000)) | would allocate ; pool(return_norms="yes") | return_norms
pool(act="relu") | activation ; ops.pool_visual_tokens(x[:0], 4, (4, 4), (2, 2, 2)) | empty
ops.pool_visual_tokens(x.long(), 4, (4, 4), (2, 2, 2)) | floating ; ops.token_norms(x.int()) | floating
ops.token_norm_stats(x, nan) | threshold ; ops.token_norm_stats(x, True) | threshold
ops.norm_stats(torch.ones(2, 3), [1.0, 2.0]) | threshold ; ops.norm_stats(torch.ones(2, 0)) | tokens
ftt(geometry=[2.5] + geom[1:]) | geometry ; ftt(geometry=[-1] + geom[1:]) | h1
ftt(geometry=[10, 10, 0, 0, 10, 10, 10, 10, 0, 0, 56]) | outside ; ftt(geometry=None) | geometry
ftt(geometry=[10**5] * 2 + [0, 0] + [10**5] * 4 + [0, 0, 10**5]) | would allocate
ftt(mean=(nan, 0, 0)) | mean[0] ; ftt(std=(0, 1, 1)) | std ; ftt(full_range="no") | full_range
ops.frames_to_tensor(f8.float(), geometry=geom) | uint8 ; ftt(dtype="float32") | dtype
ops.quantize_kv(kv, bits=4.0) | bits ; ops.quantize_kv(kv, group_size=16.0) | group_size
ops.quantize_kv(kv, key_block=True) | key_block ; ops.quantize_kv(torch.empty(4, 0)) | head dim
attn(sm_scale=nan) | sm_scale ; attn(sm_scale=inf) | sm_scale ; attn(bits=8.0) | bits
attn(group_size=16.5) | group_size ; attn(group_size=4) | k_scale ; attn(key_block=-1) | key_block
attn(k_scale=s4[:, :, :5]) | k_scale ; attn(v_win=win[:, :, :2]) | v_win ; attn(q=q.numpy()) | q must
read_video(clip, num_frames=0) | num_ ; read_video(clip, num_frames=True) | num_
read_video(clip, num_frames=2.5) | num_ ; read_video(open(clip)) | text-mode
read_video(clip, start=nan) | start ; sample_indices(10, 2.5) | num_segments
sample_indices(True, 4) | num_frames_total ; frames_to_pixel_values(f8, image_size=2.5) | image_size
frames_to_pixel_values(f8.permute(0, 3, 1, 2)) | shape (2, 3, 48, 64)
frames_to_pixel_values(f8, device="bogus") | device ; frames_to_pixel_values([]) | empty
PllavaConfig(pooling_shape=(2.5, 2, 2)) | pooling_shape ; PllavaConfig(use_pooling="no") | use_pooling
PllavaConfig(pooling_shape=(True, 2, 2)) | pooling_shape ; PllavaConfig(vision_feature_layer=99) | layer
PllavaConfig(image_token_index=1.5) | image_token ; PllavaConfig.from_pretrained(model, num_frame=8) | num_frame
KVCacheSpec("int8", window=2.5) | window ; KVCacheSpec("int8", group_size=True) | group_size
KVCacheSpec.of("int2") | kv_cache ; KVCacheSpec.of("model-dtype", {"window": 8}) | quantized
merge_lora({}, lora_alpha=nan) | lora_alpha ; list_inputs(nan_list) | nan.txt:1
load(num_frames=0) | num_frames ; load(num_frames=2.5) | num_frames ; load(device="meta") | device
load(pooling_shape=(True, 2, 2)) | pooling_shape ; load(dtype="int7") | dtype ; load(compile=1) | compile
load(kv_cache="int2") | kv_cache ; load(template="nope") | template ; load(image_size=2.5) | image_size
Model.from_pretrained(model, num_frame=8) | num_frame ; Model.from_pretrained(model, dtype="x") | dtype
pipe(clip, "Why?", max_new_tokens=2.5) | max_new_tokens ; pipe(clip, "Why?", start="1") | start
pipe(clip, "Why?", max_new_tokens=True) | max_new_tokens ; pipe(clip, "Why?", start=nan) | start
pipe(clip, "Why?", max_new_tokens=10**6) | context ; pipe(clip, "Why?", start=1, end=0.5) | end
pipe([None], "Why?") | videos[0] ; pipe([clip], [5]) | questions[0] ; pipe([], []) | no videos
load(num_frame=8) | unknown VideoPipeline option ; load(attention="fast") | attention
load(compile=True, kv_cache="int8", kv_cache_options={"key_quant": "channel"}) | key_quant
KVCacheSpec.of(8) | kv_cache ; WeightSpec.of("int8", [4]) | weight_options must be a dict
WeightSpec.of(WeightSpec("int8"), {"group_size": 32}) | not both
""".strip().splitlines()


def test_api_and_ops_refuse_bad_arguments(m, monkeypatch):
    """Each call fails at once; the model-loading ones before any weight is read."""
    # the names the table's calls use (evaluated in this function's locals)
    from pllava_fast.config import PllavaConfig  # noqa: F401
    from pllava_fast.inputs import list_inputs  # noqa: F401
    from pllava_fast.kv_spec import KVCacheSpec  # noqa: F401
    from pllava_fast.loading import merge_lora  # noqa: F401
    from pllava_fast.model import PllavaForConditionalGeneration as Model  # noqa: F401
    from pllava_fast.pipeline import VideoPipeline
    from pllava_fast.preprocess import frames_to_pixel_values  # noqa: F401
    from pllava_fast.video import read_video, sample_indices  # noqa: F401
    from pllava_fast.weight_spec import WeightSpec  # noqa: F401

    pipe = VideoPipeline.from_pretrained(m["model"])
    monkeypatch.setattr("pllava_fast.model.read_state_dict", lambda *a: pytest.fail("weights read"))

    x, kv = torch.randn(8, 16, 8), torch.randn(64, 16)
    f8, geom = torch.zeros(2, 48, 64, 3, dtype=torch.uint8), [74, 99, 0, 0, 74, 99, 56, 74, 0, 9, 56]
    codes, scale, _ = ops.quantize_kv(torch.randn(64, 16), bits=8, group_size=16)
    c4, s4 = codes.view(1, 2, 32, 16), scale.view(1, 2, 32, 1)
    win, q = torch.randn(1, 2, 4, 16), torch.randn(1, 4, 16)

    def pool(shape=(2, 2, 2), num=4, **kw):
        return ops.pool_visual_tokens(x, num, (4, 4), shape, **kw)

    def ftt(**kw):
        return ops.frames_to_tensor(f8, **{"geometry": geom, **kw})

    def attn(q=q, k_scale=s4, v_win=win, **kw):
        kw = {"bits": 8, "group_size": 16, **kw}
        return ops.decode_attention(q, c4, k_scale, s4, c4, s4, s4, win, v_win, **kw)

    def load(**kw):
        return VideoPipeline.from_pretrained(m["model"], **kw)

    scope = dict(locals(), nan=math.nan, inf=math.inf, clip=m["clip"], model=m["model"],
                 nan_list=m["nan_list"], ops=ops, torch=torch)
    failures = []
    for case in (c for line in API_CALLS for c in line.split(" ; ")):
        call, words = (part.strip() for part in case.split(" | "))
        try:
            eval(call, scope)
            failures.append(f"{call}: accepted")
        except (ValueError, TypeError) as exc:
            if words not in str(exc):
                failures.append(f"{call}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_cpu_pooling_keeps_nan_and_inf_in_their_windows(value):
    # (T, H, W) = (4, 6, 6) pooled to (2, 4, 3): overlapping and disjoint windows on every axis
    x = torch.randn(2 * 4, 36, 8)
    x[1, 7, 3] = x[6, 35, 0] = value
    got = ops.pool_visual_tokens(x, 4, (6, 6), (2, 4, 3), act="identity")
    grid = x.view(2, 4, 6, 6, 8).permute(0, 4, 1, 2, 3)
    want = torch.nn.AdaptiveAvgPool3d((2, 4, 3))(grid).permute(0, 2, 3, 4, 1).reshape(2, 24, 8)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isfinite(want).any()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite])


def test_float64_norm_stats_are_computed_not_rounded_early():
    x = torch.randn(3, 5, 7, dtype=torch.float64) * 1e3
    stats = ops.token_norm_stats(x, 1500.0)
    want = torch.linalg.vector_norm(x, dim=-1)
    assert stats.norms.dtype == torch.float32
    torch.testing.assert_close(stats.norms, want.float())
    assert torch.equal(stats.count_above, (want.float() > 1500.0).sum(1))


def test_api_follow_ups(tmp_path, tiny_model_dir):
    """read_video / sample_indices / from_pretrained name what is wrong before any work."""
    from pllava_fast.model import PllavaForConditionalGeneration
    from pllava_fast.video import read_video, sample_indices

    loop = tmp_path / "loop.mp4"
    os.symlink(loop, loop)
    with pytest.raises(ValueError, match="symbolic link loop"):
        read_video(loop)
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_video(fifo)
    with pytest.raises(ValueError, match="start must be a time"):
        sample_indices(10, 4, fps=25.0, start="1")
    with pytest.raises(ValueError, match="num_segments=1000000000"):
        sample_indices(10, 10**9)
    for kwargs, match in ((dict(device="bogus"), "device"), (dict(lora_alpha=float("nan")), "lora_alpha"),
                          (dict(attn_implementation="fast"), "attn_implementation")):
        with pytest.raises(ValueError, match=match):
            PllavaForConditionalGeneration.from_pretrained(tiny_model_dir, **kwargs)
