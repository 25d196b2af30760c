"""A multi-turn conversation about one video: decoded and preprocessed once, each turn
re-rendered in the model's template (the video token in the first user turn, earlier answers
kept)."""
from __future__ import annotations

from .conversation import get_template


class Chat:
    """A conversation about one video with a ``VideoPipeline``."""

    def __init__(self, pipe, video, *, template: str = "plain", start=None, end=None):
        self.pipe, self.template = pipe, template
        get_template(template)  # unknown names fail here, before the video is decoded
        decoded = pipe.video_decode([video], start=start, end=end)
        self.pixel_values, self.frames = pipe.preprocess(decoded)
        self.reset()

    def reset(self):
        self.conversation = get_template(self.template)
        self.turns = 0

    def ask(self, question: str, *, max_new_tokens: int = 256, streamer=None, **kwargs) -> str:
        conv = self.conversation
        conv.user_query(question, conv.pre_query_prompt, conv.post_query_prompt,
                        is_mm=self.turns == 0)
        inputs = self.pipe.tokenize([conv.get_prompt()])
        inputs["pixel_values"] = self.pixel_values
        if self.frames[0] != self.pipe.num_frames:
            inputs["frames_per_video"] = self.frames
        out = self.pipe.generate(inputs, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
        answer = out.texts[0]
        conv.assistant_response(answer)
        self.turns += 1
        return answer
