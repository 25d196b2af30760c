"""PLLaVA's prompt templates render exactly as its evaluation scripts and demo do."""
import pytest

from pllava_fast.conversation import (MVBENCH_SYSTEM, build_prompt, get_template, load_tokenizer)
from pllava_fast.testing import save_tiny_pllava

VCG_SYSTEM = ("You are Video-ChatGPT, a large vision-language assistant. You are able to understand "
              "the video content that the user provides, and assist the user with a variety of tasks "
              "using natural language.Follow the instructions carefully and explain your answers in "
              "detail based on the provided video.")


def test_plain_interleaves_the_video_token():
    assert build_prompt("What is the man doing?") == "USER:<image> What is the man doing? ASSISTANT:"


def test_plain_demo_flow():
    """The demo's order: upload (an empty multimodal query), then the question."""
    conv = get_template("plain")
    conv.user_query("", is_mm=True)
    conv.user_query("What is the man doing?")
    assert conv.get_prompt() == "USER:<image>  USER:What is the man doing? ASSISTANT:"
    conv.assistant_response("He is dancing.")
    conv.user_query("Where?")
    assert conv.get_prompt() == ("USER:<image>  USER:What is the man doing? ASSISTANT:He is "
                                 "dancing.</s>USER:Where? ASSISTANT:")


def test_mvbench_primed_with_best_option():
    question = "Question: What does the woman do?\nOptions:\n(A) dance\n(B) yoga"
    expected = (
        "Carefully watch the video and pay attention to the cause and sequence of events, the detail "
        "and movement of objects, and the action and pose of persons. Based on your observations, "
        "select the best option that accurately addresses the question.\n USER: <image>\n USER: "
        "Question: What does the woman do?\nOptions:\n(A) dance\n(B) yoga \nOnly give the best "
        "option. ASSISTANT:Best option:(")
    assert build_prompt(question, "eval_mvbench") == expected
    assert build_prompt(question, "mvbench") == expected
    assert expected.startswith(MVBENCH_SYSTEM)


def test_vcgbench_video_alone():
    assert build_prompt("Describe the video.", "eval_vcgbench") == (
        VCG_SYSTEM + " USER: <image>\n USER: Describe the video. ASSISTANT:")


def test_chatml_template_of_34b():
    assert build_prompt("Describe the video.", "chatml") == (
        VCG_SYSTEM + "<|im_end|>\n<|im_start|>user\n<image>\n<|im_end|>\n<|im_start|>user\n"
        "Describe the video.<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt("Q", "eval_mvbench_llavanext").endswith(
        "<|im_start|>user\nQ \nOnly give the best option.<|im_end|>\n<|im_start|>assistant\n"
        "Best option:(")


def test_videoqa_pre_and_post_query():
    assert build_prompt("Why?", "eval_videoqabench") == (
        "USER: <image>\n The input consists of a sequence of key frames from a video. Answer the "
        "question concisely first and followed by significant events, characters, or objects that "
        "appear throughout the frames. Question: Why? \n ASSISTANT:\nAnswer: In the video,")


def test_system_override_and_text_only():
    assert build_prompt("Hi", system="Be brief.", with_video=False) == "Be brief. USER:Hi ASSISTANT:"


def test_extract_answer():
    conv = get_template("plain")
    assert conv.extract_answer("USER:<image> Q ASSISTANT: A dog runs.</s>") == "A dog runs."
    chat = get_template("chatml")
    assert chat.extract_answer("x<|im_start|> assistant\nA dog.<|im_end|>\n") == "A dog."


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        build_prompt("x", "nope")


def test_tokenizer_keeps_image_token_whole(tmp_path):
    path = save_tiny_pllava(tmp_path)
    tok = load_tokenizer(path)
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = tok(build_prompt("What is happening?"))["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(image_id) == 1
    batch = tok(["USER:<image> a", "USER:<image> a much longer question"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padding for generation
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "absent")
