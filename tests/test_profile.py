"""Tests of the visual-token norm profiler: statistics, capture from the model, report files, CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pllava_fast import ops
from pllava_fast.profile import plots
from pllava_fast import profile as prof
from pllava_fast.inputs import expand_sources
from pllava_fast.kernels.adaptive import pool_windows
from pllava_fast.cli import main as cli_main
from pllava_fast.testing import make_clip


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    testing = pytest.importorskip("pllava_fast.testing")
    torch.manual_seed(0)
    model, tokenizer = testing.tiny_pllava()
    return model.float().eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny[0]


def _write_clip(path: Path, frames: int = 12, size=(64, 48)) -> Path:
    """A small clip of moving shapes (the demo's generator), mpeg4 so any size works."""
    w, h = size
    return Path(make_clip(path, num_frames=frames, height=h, width=w, codec="mpeg4"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return _write_clip(tmp_path_factory.mktemp("clips") / "square.mp4")


def _planted_grid(t=5, h=7, w=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = 1 + torch.rand(t, h, w, generator=g)
    planted = {(3, 6, 0): 50.0, (0, 2, 8): 40.0, (4, 0, 4): 30.0}
    for (f, r, c), v in planted.items():
        grid[f, r, c] = v
    return grid, planted


def _hand_pooled(model, prepared: torch.Tensor, num_frames: int) -> torch.Tensor:
    """PLLaVA's original order by hand: linear_2(act(linear_1)), rearrange to (B, C, T, H, W),
    nn.AdaptiveAvgPool3d, back to (B, t*h*w, C)."""
    proj = model.multi_modal_projector
    act = proj.act
    y = proj.linear_2(ops.apply_activation(proj.linear_1(prepared), act) if isinstance(act, str)
                      else act(proj.linear_1(prepared)))
    fh, fw = model.config.frame_shape
    b = y.shape[0] // num_frames
    video = y.reshape(b, num_frames, fh, fw, -1).permute(0, 4, 1, 2, 3)
    pooled = nn.AdaptiveAvgPool3d(tuple(model.config.pooling_shape))(video)
    return pooled.permute(0, 2, 3, 4, 1).reshape(b, -1, y.shape[-1])


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def test_planted_outliers_found_at_their_positions():
    # (values are exact in fp32, so the norms compare exactly)
    grid, planted = _planted_grid()
    stats = prof.grid_statistics(grid, k=5.0, top=3)
    found = {(t["frame"], t["row"], t["col"]): t["norm"] for t in stats["top_tokens"]}
    assert found == pytest.approx(planted)
    assert [t["rank"] for t in stats["top_tokens"]] == [1, 2, 3]
    assert [t["norm"] for t in stats["top_tokens"]] == [50.0, 40.0, 30.0]
    assert stats["grid"] == [5, 7, 9]


def test_statistics_match_numpy():
    grid, _ = _planted_grid()
    k = 5.0
    stats = prof.grid_statistics(grid, k=k, top=10)
    a = grid.double().numpy()
    o = stats["overall"]
    med = np.median(a)
    assert o["mean"] == pytest.approx(a.mean(), rel=1e-6)
    assert o["median"] == pytest.approx(med, rel=1e-6)
    assert o["std"] == pytest.approx(a.std(), rel=1e-6)
    assert o["max"] == pytest.approx(50.0)
    assert o["min"] == pytest.approx(a.min())
    assert o["dominance"] == pytest.approx(50.0 / med, rel=1e-6)
    assert o["count_above_k"] == 3
    assert o["fraction_above_k"] == pytest.approx(3 / a.size)
    assert len(stats["per_frame"]) == 5
    for t, f in enumerate(stats["per_frame"]):
        fm = np.median(a[t])
        assert f["frame"] == t
        assert f["median"] == pytest.approx(fm, rel=1e-6)
        assert f["max"] == pytest.approx(a[t].max())
        assert f["std"] == pytest.approx(a[t].std(), rel=1e-6)
        assert f["dominance"] == pytest.approx(a[t].max() / fm, rel=1e-6)
        assert f["count_above_k"] == int((a[t] > k * fm).sum())
    assert stats["per_frame"][3]["count_above_k"] == 1
    assert stats["per_frame"][1]["count_above_k"] == 0


def test_statistics_edge_cases():
    # one token; ties keep the lower flat index first; zero median gives a null dominance
    one = prof.grid_statistics(torch.tensor([[[2.0]]]), top=5)
    assert one["overall"]["dominance"] == 1.0 and len(one["top_tokens"]) == 1
    tie = prof.grid_statistics(torch.ones(2, 2, 2), top=3)
    assert [(t["frame"], t["row"], t["col"]) for t in tie["top_tokens"]] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0)]
    zeros = prof.grid_statistics(torch.zeros(1, 3, 3))
    assert zeros["overall"]["dominance"] is None
    json.dumps(zeros, allow_nan=False)
    with pytest.raises(ValueError, match="k must be positive"):
        prof.grid_statistics(torch.ones(1, 2, 2), k=0)
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        prof.grid_statistics(torch.ones(4, 4))


@pytest.mark.parametrize("n_in,n_out", [(16, 16), (24, 12), (7, 3), (5, 8), (1, 1), (16, 5)])
def test_pool_windows_match_adaptive_pooling(n_in, n_out):
    x = torch.randn(1, 1, n_in, dtype=torch.float64)
    expected = nn.AdaptiveAvgPool1d(n_out)(x)[0, 0]
    got = torch.stack([x[0, 0, s:e].mean() for s, e in pool_windows(n_in, n_out)])
    torch.testing.assert_close(got, expected)


def test_pooling_effect_numbers():
    before = prof.grid_statistics(_planted_grid()[0])
    after = prof.grid_statistics(torch.ones(1, 2, 2) * torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    eff = prof.pooling_effect(before, after)
    assert eff["dominance_after"] == pytest.approx(4.0 / 2.5)
    assert eff["dominance_drop"] == pytest.approx(before["overall"]["dominance"] - 1.6)
    assert eff["dominance_factor"] == pytest.approx(before["overall"]["dominance"] / 1.6)


# ---------------------------------------------------------------------------------------------
# capture from the model
# ---------------------------------------------------------------------------------------------
def _features(model, frames: int, seed=0):
    fh, fw = model.config.frame_shape
    d = model.config.vision_config.hidden_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, fh * fw, d, generator=g)


def test_planted_feature_outliers_found_with_their_norms(tiny_model):
    cfg = tiny_model.config
    t = cfg.num_frames
    fh, fw = cfg.frame_shape
    feats = _features(tiny_model, t)
    spots = [(t - 1, fh - 1, 0), (0, 0, fw - 1), (t // 2, fh // 2, fw // 2)]
    for scale, (f, r, c) in zip((300.0, 200.0, 100.0), spots):
        feats[f, r * fw + c] = scale * torch.randn(feats.shape[-1]).sign()
    (norms,) = prof.norms_from_features(tiny_model, feats)
    stats = prof.grid_statistics(norms.vision, top=3)
    assert [(x["frame"], x["row"], x["col"]) for x in stats["top_tokens"]] == spots
    for tok, (f, r, c) in zip(stats["top_tokens"], spots):
        assert tok["norm"] == pytest.approx(
            torch.linalg.vector_norm(feats[f, r * fw + c].double()).item(), rel=1e-5)
    assert norms.vision.shape == (t, fh, fw)
    assert norms.projector.shape == (t, fh, fw)
    assert norms.pooled.shape == tuple(cfg.pooling_shape)
    # projector point: the original-order output, norm by norm
    proj = tiny_model.multi_modal_projector
    with torch.no_grad():
        full = proj.linear_2(ops.apply_activation(proj.linear_1(feats), proj.act))
    torch.testing.assert_close(norms.projector,
                               torch.linalg.vector_norm(full, dim=-1).reshape(t, fh, fw),
                               rtol=1e-5, atol=1e-5)


def test_pooled_dominance_equals_adaptive_avg_pool3d_by_hand(tiny_model):
    cfg = tiny_model.config
    t = cfg.num_frames
    feats = _features(tiny_model, 2 * t, seed=3)
    feats[1, 5] *= 40.0       # an outlier in video 0
    feats[t + 2, 0] *= 60.0   # and in video 1
    results = prof.norms_from_features(tiny_model, feats, [t, t])
    with torch.no_grad():
        hand = _hand_pooled(tiny_model, feats, t)
    for v, norms in enumerate(results):
        hand_norms = torch.linalg.vector_norm(hand[v].double(), dim=-1).numpy()
        expected = hand_norms.max() / np.median(hand_norms)
        stats = prof.grid_statistics(norms.pooled)
        assert stats["overall"]["dominance"] == pytest.approx(expected, rel=1e-4)
        np.testing.assert_allclose(norms.pooled.reshape(-1).numpy(), hand_norms, rtol=1e-4,
                                   atol=1e-5)
        before = prof.grid_statistics(norms.projector)
        eff = prof.pooling_effect(before, stats)
        assert eff["dominance_drop"] == pytest.approx(
            before["overall"]["dominance"] - expected, rel=1e-4, abs=1e-4)


def test_short_clip_keeps_its_frames_at_the_vision_point(tiny_model):
    cfg = tiny_model.config
    short = max(1, cfg.num_frames // 2 - 1)
    (norms,) = prof.norms_from_features(tiny_model, _features(tiny_model, short), [short])
    assert norms.vision.shape[0] == short
    assert norms.projector.shape[0] == cfg.num_frames
    assert norms.pooled.shape == tuple(cfg.pooling_shape)


def test_capture_matches_get_video_features(tiny_model):
    cfg = tiny_model.config
    s = cfg.vision_config.image_size
    pv = torch.randn(cfg.num_frames, 3, s, s)
    (norms,) = prof.capture_token_norms(tiny_model, pv, [cfg.num_frames])
    with torch.no_grad():
        tokens = tiny_model.get_video_features(pv)
    torch.testing.assert_close(norms.pooled.reshape(-1),
                               torch.linalg.vector_norm(tokens[0].float(), dim=-1),
                               rtol=1e-5, atol=1e-5)


def test_recorder_during_generate(tiny):
    from pllava_fast.testing import random_pixel_values

    tiny_model, tok = tiny
    cfg = tiny_model.config
    pv = random_pixel_values(2 * cfg.num_frames, cfg, seed=5)
    enc = tok(["USER:<image> What is happening? ASSISTANT:"] * 2, return_tensors="pt")
    with prof.NormRecorder(tiny_model) as rec:
        tiny_model.generate(**enc, pixel_values=pv, max_new_tokens=3, do_sample=False)
    tiny_model.get_video_features(pv)  # after the context: not recorded
    assert len(rec.norms) == 2
    expected = prof.capture_token_norms(tiny_model, pv)
    for got, want in zip(rec.norms, expected):
        for point in prof.POINTS:
            torch.testing.assert_close(getattr(got, point), getattr(want, point),
                                       rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# report files
# ---------------------------------------------------------------------------------------------
POINT_STATS_KEYS = {"mean", "median", "std", "min", "max", "dominance", "count_above_k",
                    "fraction_above_k"}
REPORT_SCHEMA = {
    "schema": str, "schema_version": int, "created": str, "video": dict, "model": dict,
    "config": dict, "versions": dict, "points": dict, "pooling": dict, "plots": dict,
    "timing_s": dict,
}
VIDEO_KEYS = {"source", "frame_indices", "fps", "num_frames_total", "height", "width",
              "num_frames_sampled"}
MODEL_KEYS = {"name", "vision_feature_layer", "image_size", "patch_size", "vision_hidden_size",
              "text_hidden_size", "frame_shape", "pooling_shape", "num_frames", "projector_act",
              "dtype", "device"}
POOLING_KEYS = {"before", "after", "dominance_before", "dominance_after", "dominance_drop",
                "dominance_factor", "max_before", "max_after", "fraction_above_k_before",
                "fraction_above_k_after"}
PLOTS = ("heatmaps_vision", "heatmaps_projector", "heatmaps_pooled", "histogram", "curves")


def check_report_schema(report: dict) -> None:
    for key, typ in REPORT_SCHEMA.items():
        assert isinstance(report[key], typ), key
    assert report["schema"] == "pllava-fast/profile-report" and report["schema_version"] == 1
    assert VIDEO_KEYS <= set(report["video"])
    assert MODEL_KEYS <= set(report["model"])
    assert {"k", "top", "num_frames"} <= set(report["config"])
    assert {"pllava_fast", "torch", "transformers", "python"} <= set(report["versions"])
    assert set(report["points"]) == {"vision", "projector", "pooled"}
    for name, point in report["points"].items():
        t, h, w = point["grid"]
        assert POINT_STATS_KEYS | {"frame"} == set(point["per_frame"][0])
        assert POINT_STATS_KEYS == set(point["overall"])
        assert len(point["per_frame"]) == t
        assert len(point["top_tokens"]) == min(report["config"]["top"], t * h * w)
        for tok in point["top_tokens"]:
            assert {"rank", "frame", "row", "col", "norm", "ratio_to_median"} <= set(tok)
            assert 0 <= tok["frame"] < t and 0 <= tok["row"] < h and 0 <= tok["col"] < w
        if name == "pooled":
            assert {"frames", "rows", "cols"} == set(point["top_tokens"][0]["window"])
    assert POOLING_KEYS == set(report["pooling"])


def _expected_size(name: str, report: dict, with_frames: bool) -> tuple[int, int]:
    if name.startswith("heatmaps_"):
        point = name.split("_", 1)[1]
        t = report["points"][point]["grid"][0]
        return plots.pixel_size(plots.heatmap_figsize(t, with_frames and point == "vision"))
    return plots.pixel_size(plots.HISTOGRAM_FIGSIZE if name == "histogram" else plots.CURVES_FIGSIZE)


def check_pngs(out: Path, report: dict, with_frames: bool) -> None:
    assert set(report["plots"]) == set(PLOTS)
    for name in PLOTS:
        entry = report["plots"][name]
        path = out / entry["file"]
        assert path.is_file() and path.stat().st_size > 5000, path
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG"
            assert img.size == (entry["width"], entry["height"])
            assert img.size == _expected_size(name, report, with_frames)
            pixels = np.asarray(img.convert("L"), dtype=np.float64)
        assert pixels.std() > 5, f"{name} looks blank"
    md = (out / "report.md").read_text()
    for name in PLOTS:
        assert f"]({report['plots'][name]['file']})" in md


def test_report_files_from_norm_grids(tmp_path):
    grid, _ = _planted_grid()  # (5, 7, 9), the largest token at (3, 6, 0)
    pooled = nn.AdaptiveAvgPool3d((2, 3, 3))(grid[None, None])[0, 0]
    norms = prof.TokenNorms(vision=grid * 3, projector=grid, pooled=pooled)
    report = prof.build_report(norms, k=5, top=4, video={"source": "planted", "frame_indices":
                               [0, 10, 20, 30, 40]}, config={"num_frames": 5})
    thumbs = torch.randint(0, 255, (5, 28, 28, 3), dtype=torch.uint8)
    report = prof.write_report(report, norms, tmp_path, thumbs)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["points"]["vision"]["top_tokens"][0]["norm"] == pytest.approx(150.0)
    # the pooled cell holding (3, 6, 0) averages frames 2-4, rows 4-6, cols 0-2 (end exclusive)
    top = on_disk["points"]["pooled"]["top_tokens"][0]
    assert (top["frame"], top["row"], top["col"]) == (1, 2, 0)
    assert top["window"] == {"frames": [2, 5], "rows": [4, 7], "cols": [0, 3]}
    assert top["norm"] == pytest.approx(grid[2:5, 4:7, 0:3].mean().item(), rel=1e-6)
    check_pngs(tmp_path, on_disk, with_frames=True)


def test_profile_video_api_writes_documented_report(tiny_model, clip, tmp_path):
    report = prof.profile_video(tiny_model, clip, out_dir=tmp_path, k=3.0, top=5)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    check_report_schema(on_disk)
    assert on_disk["config"]["k"] == 3.0
    assert on_disk["video"]["source"].endswith("square.mp4")
    assert on_disk["video"]["num_frames_sampled"] == tiny_model.config.num_frames
    check_pngs(tmp_path, on_disk, with_frames=True)


# ---------------------------------------------------------------------------------------------
# CLI and errors
# ---------------------------------------------------------------------------------------------
def test_cli_end_to_end_one_video(clip, tmp_path, capsys):
    testing = pytest.importorskip("pllava_fast.testing")
    ckpt = testing.save_tiny_pllava(str(tmp_path / "ckpt"))
    out = tmp_path / "prof"
    rc = cli_main(["profile", str(clip), "--model", ckpt, "--out", str(out), "--k", "4",
                   "--top", "6", "--num-frames", "4", "--device", "cpu", "--dtype", "float32"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    check_report_schema(report)
    assert report["config"] == {"k": 4.0, "top": 6, "num_frames": 4}
    assert report["points"]["vision"]["grid"][0] == 4
    check_pngs(out, report, with_frames=True)
    assert report["model"]["name"] == ckpt and report["model"]["dtype"] == "float32"
    assert "report.md" in capsys.readouterr().out
    assert cli_main(["profile", str(clip), "--model", str(tmp_path / "none"), "--out",
                     str(out)]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_cli_several_videos_write_a_summary(tiny_model, clip, tmp_path, capsys):
    other = _write_clip(tmp_path / "other.mp4", frames=20, size=(48, 64))
    folder = tmp_path / "more"
    folder.mkdir()
    _write_clip(folder / "square.mp4", frames=6)  # same name as `clip`: gets its own subdir
    out = tmp_path / "out"
    rc = cli_main(["profile", str(clip), str(other), str(folder), "--out", str(out), "--no-plots"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["videos"]] == ["square", "other", "square_2"]
    table = (out / "summary.md").read_text()
    for row in summary["videos"]:
        report = json.loads((out / row["report"]).read_text())
        check_report_schema({**report, "plots": {}})
        assert row["pooled_dominance"] == report["pooling"]["dominance_after"]
        assert f"[{row['name']}]({row['name']}/report.md)" in table
        assert not list((out / row["name"]).glob("*.png"))


def test_cli_without_video_is_a_usage_error(tmp_path, capsys):
    assert cli_main(["profile", "--out", str(tmp_path)]) == 2
    assert "VIDEO" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no videos given"):
        prof.profile_videos(None, [], tmp_path)


def test_missing_and_empty_inputs_are_named(tmp_path, capsys):
    missing = tmp_path / "nope.mp4"
    assert cli_main(["profile", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "video not found" in err and "nope.mp4" in err
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert cli_main(["profile", str(empty_dir), "--out", str(tmp_path / "o")]) == 2
    assert "no video files" in capsys.readouterr().err


def test_folders_expand_to_videos_or_stay_one_frame_folder(tmp_path):
    vids = tmp_path / "vids"
    vids.mkdir()
    for name in ("b.mp4", "a.mkv", "notes.txt"):
        (vids / name).write_bytes(b"")
    assert expand_sources(vids) == [vids / "a.mkv", vids / "b.mp4"]
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(frames / f"{i:03d}.png")
    assert expand_sources([frames, vids / "a.mkv"]) == [frames, vids / "a.mkv"]
    one = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    assert len(expand_sources(one)) == 1


def test_unreadable_video_is_named(tiny_model, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        prof.profile_video(tiny_model, bad)
    assert cli_main(["profile", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "broken.mp4" in capsys.readouterr().err


def test_out_dir_not_writable(clip, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert cli_main(["profile", str(clip), "--out", str(a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli_main(["profile", str(clip), "--out", str(a_file / "sub")]) == 2
    assert "cannot be created" in capsys.readouterr().err
    with pytest.raises(PermissionError, match="cannot be created"):
        prof.profile_video(None, clip, out_dir=a_file / "sub")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only directories")
def test_read_only_out_dir(clip, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli_main(["profile", str(clip), "--out", str(ro)]) == 1
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)
