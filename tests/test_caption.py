"""Captioning: input listing, sharding, crash-safe JSONL rows, restart and multi-rank runs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pllava_fast import cli, dataset, inputs
from pllava_fast.cli import common
from pllava_fast.cli.common import parse_pooling

# -- pure parts -----------------------------------------------------------------------------------


def test_list_inputs_folder_and_list_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "a.MOV", "sub/c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = [item["video"] for item in inputs.list_inputs(str(tmp_path))]
    assert found == sorted(str(tmp_path / n) for n in ("a.MOV", "b.mp4", "sub/c.png"))

    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n\nb.mp4\n/abs/x.mp4\n"
                       '{"video": "a.MOV", "start": 1.5, "end": 3}\n')
    items = inputs.list_inputs(str(listing))
    assert items == [{"video": str(tmp_path / "b.mp4")}, {"video": "/abs/x.mp4"},
                     {"video": str(tmp_path / "a.MOV"), "start": 1.5, "end": 3}]


def test_list_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input not found"):
        inputs.list_inputs(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text('{"path": "x.mp4"}\n')
    with pytest.raises(ValueError, match="bad.txt:1: JSON line has no 'video'"):
        inputs.list_inputs(str(bad))


@pytest.mark.parametrize("n,world", [(0, 1), (7, 1), (7, 2), (10, 3), (2, 4)])
def test_shard_is_a_disjoint_cover(n, world):
    items = [{"video": f"v{i}"} for i in range(n)]
    shards = [inputs.shard(items, r, world) for r in range(world)]
    flat = [it["video"] for s in shards for it in s]
    assert sorted(flat) == sorted(it["video"] for it in items)
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="RANK=2 is outside WORLD_SIZE=2"):
        inputs.shard(items, 2, 2)


def test_rows_survive_a_torn_line_and_restart(tmp_path):
    out = str(tmp_path / "captions.jsonl")
    part = dataset.part_path(out, 0)
    w = dataset.RowWriter(part)
    w.write({"video": "a", "ok": True, "caption": "x"})
    w.write({"video": "b", "ok": False, "error": "bad"})
    w.close()
    with open(part, "a") as f:
        f.write('{"video": "c", "ok": tr')  # a killed writer
    assert [r["video"] for r in dataset.read_rows(part)] == ["a", "b"]
    w = dataset.RowWriter(part)  # restart: the torn tail goes, new rows start on their own line
    w.write({"video": "c", "ok": True, "caption": "z"})
    w.close()
    assert [r["video"] for r in dataset.read_rows(part)] == ["a", "b", "c"]
    # a later successful row wins over an earlier error row of the same video
    w = dataset.RowWriter(dataset.part_path(out, 1))
    w.write({"video": "b", "ok": True, "caption": "y"})
    w.close()
    done = dataset.done_rows(out)
    assert done["b"]["ok"] and set(done) == {"a", "b", "c"}
    rows, missing = dataset.merge(out, [{"video": v} for v in ("c", "b", "a", "d")])
    assert (rows, missing) == (3, 1)
    assert [json.loads(line)["video"] for line in open(out)] == ["c", "b", "a"]


def test_parse_pooling():
    assert parse_pooling("16,12,12") == (16, 12, 12)
    assert parse_pooling(None) is None
    for bad in ("16,12", "a,b,c", "0,1,1"):
        with pytest.raises(ValueError, match="--pooling"):
            parse_pooling(bad)


# -- runs on the tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from pllava_fast.testing import make_clip

    root = tmp_path_factory.mktemp("clips")
    paths = [make_clip(root / f"clip{i}.mp4", num_frames=6 + i, height=64, width=80, seed=i)
             for i in range(6)]
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(512))
    return [str(p) for p in paths], str(corrupt)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return str(tiny_model_dir)  # the session's tiny checkpoint (tests/conftest.py)


# one intra-op thread per subprocess: the tiny model gains nothing from more, and spare threads
# spinning on a busy 2-core machine slow every op down
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "pllava_fast", "caption", *args],
                          capture_output=True, text=True, env=ENV, timeout=240, **kw)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_direct_mode_with_corrupt_video(clips, tiny_dir, capsys):
    paths, corrupt = clips
    rc = cli.main(["caption", paths[0], corrupt, paths[1], "--model", tiny_dir, "--json",
                       "--batch-size", "2", "--max-new-tokens", "4"])
    assert rc == common.EXIT_SOME_FAILED
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_video = {r["video"]: r for r in rows}
    assert len(rows) == 3 and set(by_video) == {paths[0], corrupt, paths[1]}
    assert by_video[paths[0]]["ok"] and by_video[paths[1]]["ok"]
    assert not by_video[corrupt]["ok"] and by_video[corrupt]["error"]


def test_usage_errors_have_exit_code_2(tmp_path, tiny_dir, capsys):
    assert cli.main(["caption", "x.mp4", "--model", str(tmp_path / "nope")]) == common.EXIT_USAGE
    assert cli.main(["caption", "--model", tiny_dir]) == common.EXIT_USAGE
    assert cli.main(["caption", "--input", str(tmp_path), "--model", tiny_dir]) == common.EXIT_USAGE
    assert cli.main(["caption", "x.mp4", "--model", tiny_dir, "--pooling", "1,2"]) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert "model directory not found" in err and "nothing to caption" in err
    assert "--input needs --output" in err and "--pooling" in err


def test_sigkill_midway_then_restart_gives_every_input_once(clips, tiny_dir, tmp_path):
    paths, corrupt = clips
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(paths + [corrupt]) + "\n")
    out = tmp_path / "captions.jsonl"
    args = ["--input", str(listing), "--output", str(out), "--model", tiny_dir,
            "--max-new-tokens", "16", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "pllava_fast", "caption", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = dataset.part_path(str(out), 0)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(part) and len(dataset.read_rows(part)) >= 2:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killed:
        # a torn line as a kill during write would leave it
        with open(part, "a") as f:
            f.write('{"video": "' + paths[-1])
        assert not out.exists()
    first = {r["video"] for r in dataset.read_rows(part)}
    if killed:
        assert 2 <= len(first) < len(paths) + 1

    again = _cli(args)
    assert again.returncode == common.EXIT_SOME_FAILED, again.stderr  # the corrupt input
    assert f"{len(first)} already done" in again.stderr
    rows = _rows(out)
    assert [r["video"] for r in rows] == paths + [corrupt]  # input order, each exactly once
    assert all(r["ok"] for r in rows[:-1]) and not rows[-1]["ok"]
    assert [r["video"] for r in dataset.read_rows(part)].count(paths[0]) == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_split_inputs_without_overlap(clips, tiny_dir, tmp_path):
    paths, _ = clips
    out = tmp_path / "captions.jsonl"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pllava_fast", "caption", *paths, "--output", str(out),
             "--model", tiny_dir, "--max-new-tokens", "3", "--workers", "0", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    parts = [{r["video"] for r in dataset.read_rows(dataset.part_path(str(out), r))}
             for r in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(paths)
    assert [r["video"] for r in _rows(out)] == paths
    summaries = [json.loads(o.strip().splitlines()[-1]) for o, _ in results]
    assert sorted(s["inputs"] for s in summaries) == [3, 3]
