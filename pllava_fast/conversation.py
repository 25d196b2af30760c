"""PLLaVA's prompt templates and tokenizer loading.

The templates reproduce PLLaVA's evaluation/demo conversations character for character (roles,
separators, where ``<image>`` goes, system prompts); the rendering rules follow its
``Conversation.get_prompt``: ``system + sep0`` (when there is a system prompt), then each message as
``role + text + sep(role)``, and the last message, when it is the user's, followed by the assistant
role (when it is the assistant's, e.g. a primed "Best option:(", it is left open).
"""
from __future__ import annotations

import copy
import dataclasses
import os

IMAGE_TOKEN = "<image>"


@dataclasses.dataclass
class Conversation:
    """A conversation in one of PLLaVA's templates.

    ``mm_alone``: the video is its own user message (``<image>\\n``); otherwise it is prefixed to the
    user's query (interleaved).
    """

    system: str
    roles: tuple[str, str]
    sep: tuple[str, str]
    mm_token: str
    mm_alone: bool = False
    pre_query_prompt: str | None = None
    post_query_prompt: str | None = None
    answer_prompt: str | None = None
    messages: list[list[str]] = dataclasses.field(default_factory=list)

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)

    def user_query(self, query: str | None = None, pre_query_prompt: str | None = None,
                   post_query_prompt: str | None = None, is_mm: bool = False) -> "Conversation":
        """Append a user turn; ``is_mm`` adds the video token as the template places it."""
        query = "" if query is None else query
        if post_query_prompt is not None:
            query = f"{query} {post_query_prompt}"
        if pre_query_prompt is not None:
            query = f"{pre_query_prompt} {query}"
        if is_mm:
            if self.mm_alone:
                self.messages.append([self.roles[0], self.mm_token])
            elif self.mm_token not in query:
                query = f"{self.mm_token} {query}"
        self.messages.append([self.roles[0], query])
        return self

    def assistant_response(self, response: str | None) -> "Conversation":
        """Append an assistant turn (a final one primes the answer, e.g. "Best option:(")."""
        self.messages.append([self.roles[1], "" if response is None else response])
        return self

    def get_prompt(self) -> str:
        sep = dict(zip(self.roles, self.sep))
        out = self.system + sep[self.roles[0]] if self.system else ""
        for i, (role, message) in enumerate(self.messages):
            if i + 1 < len(self.messages):
                out += role + message + sep[role]
            elif role != self.roles[-1]:
                out += role + message + sep[role] + self.roles[-1]
            else:
                out += role + message
        return out

    def extract_answer(self, decoded: str) -> str:
        """The assistant's answer from a decoded full sequence (or from the new tokens alone)."""
        tag = "<|im_start|> assistant\n" if self.roles[-1] == "<|im_start|>assistant\n" else self.roles[-1]
        return decoded.split(tag)[-1].removesuffix(self.sep[1]).strip()


_VCG_SYSTEM = (
    "You are Video-ChatGPT, a large vision-language assistant. You are able to understand the video "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.Follow the instructions carefully and explain your answers in detail based on the "
    "provided video.")
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail "
    "and movement of objects, and the action and pose of persons. Based on your observations, "
    "select the best option that accurately addresses the question.\n")
RECAPTION_SYSTEM = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a "
    "video recaptioning task.\n"
    "The user will provide you with the video and maybe some extra noisy information to help you "
    "out. Make use of the information in a proper way to be competent for the recaption job\n"
    "### INSTRUCTIONS:\n"
    "1. Follow the user's instruction.\n"
    "2. Be critical yet believe in yourself.\n")
_VIDEOQA_PRE = (
    "The input consists of a sequence of key frames from a video. Answer the question concisely "
    "first and followed by significant events, characters, or objects that appear throughout the "
    "frames. Question:")
_VICUNA = dict(roles=("USER: ", "ASSISTANT:"), sep=(" ", "</s>"))
_CHATML = dict(roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
               sep=("<|im_end|>\n", "<|im_end|>\n"))

TEMPLATES: dict[str, Conversation] = {
    # PLLaVA's demo: "USER:" without a space, "<image>" prefixed to the query
    "plain": Conversation(system="", roles=("USER:", "ASSISTANT:"), sep=(" ", "</s>"),
                          mm_token=IMAGE_TOKEN),
    "eval_vcgbench": Conversation(system=_VCG_SYSTEM, mm_token="<image>\n", mm_alone=True, **_VICUNA),
    "eval_vcg_llavanext": Conversation(system=_VCG_SYSTEM, mm_token="<image>\n", mm_alone=True,
                                       **_CHATML),
    "eval_mvbench": Conversation(system=MVBENCH_SYSTEM, mm_token="<image>\n", mm_alone=True,
                                 post_query_prompt="\nOnly give the best option.",
                                 answer_prompt="Best option:(", **_VICUNA),
    "eval_mvbench_llavanext": Conversation(system=_VCG_SYSTEM, mm_token="<image>\n", mm_alone=True,
                                           post_query_prompt="\nOnly give the best option.",
                                           answer_prompt="Best option:(", **_CHATML),
    "eval_videoqabench": Conversation(system="", mm_token="<image>\n", pre_query_prompt=_VIDEOQA_PRE,
                                      post_query_prompt="\n", answer_prompt="\nAnswer: In the video,",
                                      **_VICUNA),
    "eval_videoqa_llavanext": Conversation(
        system="<|im_start|>system\nAnswer the question.", mm_token="<image>\n",
        pre_query_prompt=_VIDEOQA_PRE, post_query_prompt="\n",
        answer_prompt="\nAnswer: In the video,", **_CHATML),
    "eval_recaption": Conversation(system=RECAPTION_SYSTEM, mm_token="<image>\n", mm_alone=True,
                                   **_VICUNA),
    "eval_recaption_llavanext": Conversation(system=RECAPTION_SYSTEM, mm_token="<image>\n",
                                             mm_alone=True, **_CHATML),
}
ALIASES = {"mvbench": "eval_mvbench", "chatml": "eval_vcg_llavanext",
           "mvbench_chatml": "eval_mvbench_llavanext", "vcg": "eval_vcgbench",
           "recaption": "eval_recaption", "videoqa": "eval_videoqabench"}


def get_template(name: str) -> Conversation:
    """A fresh copy of template ``name`` (a PLLaVA conv_mode or an alias in ALIASES)."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; expected one of "
                         f"{sorted(TEMPLATES) + sorted(ALIASES)}")
    return TEMPLATES[key].copy()


def build_prompt(question: str, template: str = "plain", *, system: str | None = None,
                 with_video: bool = True) -> str:
    """A single-turn prompt as PLLaVA's evaluation scripts build it: the template's pre/post query
    prompts around ``question``, the video token placed as the template says, and the template's
    answer priming (e.g. MVBench's "Best option:(") left open for the model."""
    conv = get_template(template)
    if system is not None:
        conv.system = system
    conv.user_query(question, conv.pre_query_prompt, conv.post_query_prompt, is_mm=with_video)
    if conv.answer_prompt is not None:
        conv.assistant_response(conv.answer_prompt)
    return conv.get_prompt()


def load_tokenizer(path, *, padding_side: str = "left"):
    """The tokenizer saved in checkpoint directory ``path`` (local files only), left padding,
    with ``<image>`` as one token."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no usable tokenizer files in {path!r}: {err}") from err
    tokenizer.padding_side = padding_side
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
