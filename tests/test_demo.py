"""The demo runs the whole pipeline end to end (generated clip, tiny model) and prints a table."""
import json

import av

from pllava_fast import cli, testing


def test_make_clip_writes_a_playable_h264_clip(tmp_path):
    path = testing.make_clip(tmp_path / "c.mp4", num_frames=5, height=48, width=64)
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert stream.codec_context.name == "h264" and len(frames) == 5
    assert frames[0].shape == (48, 64, 3)
    assert (frames[0] != frames[-1]).any()  # the shapes move


def test_demo_without_arguments_runs_end_to_end(capsys):
    assert cli.main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "generated clip" in out
    for stage in ("video_decode", "preprocess", "vision", "projector", "prefill", "llm_decode",
                  "TTFT"):
        assert stage in out


def test_demo_with_given_video_and_model_json(capsys, tmp_path):
    from pllava_fast.testing import save_tiny_pllava

    model = save_tiny_pllava(tmp_path / "m", num_frames=2, pooling_shape=(2, 1, 1))
    video = testing.make_clip(tmp_path / "v.mp4", num_frames=3, height=32, width=32)
    rc = cli.main(["demo", "--video", video, "--model", model, "--question", "Why?",
                    "--max-new-tokens", "3", "--json", "--kv-cache", "int8"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["question"] == "Why?" and isinstance(result["answer"], str)
    assert result["timings"]["new_tokens"] <= 3


def test_demo_missing_inputs_exit_2(tmp_path, capsys):
    assert cli.main(["demo", "--video", str(tmp_path / "nope.mp4")]) == 2
    assert cli.main(["demo", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
