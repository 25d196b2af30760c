"""VideoPipeline: video_decode -> preprocess -> prompt -> generate, batching, streaming, timings."""
import pytest
import torch

from pllava_fast.testing import make_clip
from pllava_fast.pipeline import VideoPipeline
from pllava_fast.timing import STAGES, StageTimer, format_timings
from pllava_fast.original import ReferencePllava

QUESTION = "What is happening in the video?"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def pipe(model_dir):
    return VideoPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [make_clip(root / "long.mp4", num_frames=12, height=64, width=96, seed=1),
            make_clip(root / "short.mp4", num_frames=2, height=72, width=72, seed=2)]


def test_answers_match_the_original_forward_order(pipe, clips):
    """Same prompt and pixels through pllava_fast.reference (full hidden states, linear_2 before
    pooling, DynamicCache loop) give the same greedy tokens."""
    out = pipe(clips[:1], QUESTION, max_new_tokens=10)
    inputs = pipe.prepare(clips[:1], [QUESTION])
    ref = ReferencePllava.from_model(pipe.model).generate(
        inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens=10,
        eos_token_id=pipe.tokenizer.eos_token_id)
    new = ref[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(out.sequences[:, :new.shape[1]], new)
    assert out.texts[0] == pipe.tokenizer.decode(new[0], skip_special_tokens=True).strip()


def test_batch_equals_one_by_one(pipe, clips):
    questions = [QUESTION, "Describe the video."]
    batch = pipe(clips, questions, max_new_tokens=8)
    assert batch.timings["batch_size"] == 2
    for i, clip in enumerate(clips):
        one = pipe([clip], [questions[i]], max_new_tokens=8)
        n = one.sequences.shape[1]
        assert torch.equal(batch.sequences[i, :n], one.sequences[0])
        assert batch.texts[i] == one.texts[0]


def test_one_video_as_bytes_or_decoded(pipe, clips):
    """bytes, bytearray and a DecodedVideo are one video each, not a sequence of videos."""
    from pllava_fast.video import read_video
    want = pipe(clips[0], QUESTION, max_new_tokens=6)
    data = open(clips[0], "rb").read()
    decoded = read_video(clips[0], num_frames=pipe.num_frames)
    for video in (data, bytearray(data), memoryview(data), decoded):
        out = pipe(video, QUESTION, max_new_tokens=6)
        assert out.texts == want.texts, type(video).__name__
        assert torch.equal(out.sequences, want.sequences)


def test_streaming_yields_the_same_text(pipe, clips):
    pieces = list(pipe.stream(clips[0], QUESTION, max_new_tokens=12))
    assert len(pieces) >= 1
    assert "".join(pieces).strip() == pipe.answer(clips[0], QUESTION, max_new_tokens=12)


def test_timings_cover_every_stage(pipe, clips):
    out = pipe(clips[:1], QUESTION, max_new_tokens=6, min_new_tokens=6)
    t = out.timings
    for stage in STAGES:
        assert t[f"{stage}_s"] > 0, stage
    assert t["llm_decode_steps"] == 5 and t["new_tokens"] == 6
    assert t["llm_decode_tokens_per_s"] > 0
    assert t["ttft_s"] == pytest.approx(sum(t[f"{s}_s"] for s in STAGES[:-1]))
    table = format_timings(t)
    assert "prefill" in table and "tokens/s" in table
    assert "get_video_features" not in vars(pipe.model)  # the probe is removed after the run


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_cache_runs(model_dir, clips, kind):
    from pllava_fast.quantized_cache import QuantizedKVCache

    qpipe = VideoPipeline.from_pretrained(model_dir, kv_cache=kind)
    assert isinstance(qpipe.make_cache(), QuantizedKVCache)
    out = qpipe(clips, QUESTION, max_new_tokens=6)
    assert out.sequences.shape[0] == 2 and all(isinstance(t, str) for t in out.texts)


def test_pooling_and_frames_overrides(model_dir, clips):
    p = VideoPipeline.from_pretrained(model_dir, num_frames=2, pooling_shape=(1, 2, 2))
    assert p.num_frames == 2
    inputs = p.prepare(clips[:1], [QUESTION])
    assert inputs["pixel_values"].shape[0] == 2
    assert p.model.get_video_features(inputs["pixel_values"]).shape[1] == 4


def test_bad_inputs(pipe, clips, tmp_path):
    with pytest.raises(ValueError, match="2 videos but 3 questions"):
        pipe.prepare(clips, ["a", "b", "c"])
    with pytest.raises((FileNotFoundError, ValueError), match="missing.mp4"):
        pipe([str(tmp_path / "missing.mp4")], QUESTION)
    with pytest.raises(ValueError, match="exactly one image token"):
        pipe.tokenize(["no video token here"])
    with pytest.raises(ValueError, match="kv_cache"):
        VideoPipeline(pipe.model, pipe.tokenizer, kv_cache="int2")
    with pytest.raises(FileNotFoundError, match="model directory"):
        VideoPipeline.from_pretrained(tmp_path / "nope")


def test_stage_timer_accumulates():
    timer = StageTimer()
    with timer.stage("a"):
        pass
    with timer.stage("a"):
        pass
    assert timer.counts["a"] == 2 and timer.seconds["a"] >= 0


def test_device_map_dispatch_keeps_answers(model_dir, pipe, clips):
    """A device map through accelerate (here every module on the one CPU: no GPUs to split over)
    leaves generate() and its answers unchanged."""
    split = VideoPipeline.from_pretrained(
        model_dir, device_map={"vision_tower": "cpu", "multi_modal_projector": "cpu",
                               "language_model": "cpu"})
    want = pipe(clips[:1], QUESTION, max_new_tokens=6)
    got = split(clips[:1], QUESTION, max_new_tokens=6)
    assert torch.equal(got.sequences, want.sequences)
    auto = VideoPipeline.from_pretrained(model_dir, device_map="auto")
    assert auto(clips[:1], QUESTION, max_new_tokens=6).texts == want.texts
    with pytest.raises(ValueError, match="device_map"):
        VideoPipeline.from_pretrained(model_dir, device_map="everywhere")


def test_kv_cache_options_reach_make_cache(model_dir, clips, monkeypatch):
    from pllava_fast import pipeline
    from pllava_fast.quantized_cache import QuantizedKVCache

    qpipe = VideoPipeline.from_pretrained(
        model_dir, kv_cache="int4", kv_cache_options={"window": 8, "group_size": 32,
                                                      "key_quant": "channel"})
    built = []
    make_cache = pipeline.make_cache
    monkeypatch.setattr(pipeline, "make_cache",
                        lambda *a, **kw: built.append(a) or make_cache(*a, **kw))
    out = qpipe(clips[:1], QUESTION, max_new_tokens=4)
    assert len(out.texts) == 1
    assert built == [(qpipe.kv_cache_spec, qpipe.model.config)]
    assert qpipe.kv_cache_spec.options() == {"window": 8, "group_size": 32, "key_quant": "channel"}
    cache = qpipe.make_cache()
    assert isinstance(cache, QuantizedKVCache)
    assert (cache.bits, cache.window, cache.group_size, cache.key_quant) == (4, 8, 32, "channel")


def test_bad_kv_cache_options(pipe, model_dir):
    with pytest.raises(ValueError, match="quantized caches only"):
        VideoPipeline(pipe.model, pipe.tokenizer, kv_cache_options={"window": 8})
    with pytest.raises(ValueError, match="group_size"):
        VideoPipeline(pipe.model, pipe.tokenizer, kv_cache="int8",
                      kv_cache_options={"group_size": 48})
    with pytest.raises(ValueError, match="unknown kv_cache_options"):
        VideoPipeline.from_pretrained(model_dir, kv_cache="int8", kv_cache_options={"bits": 2})
