"""Conversation templates in LLaVA's formats: `plain` (stage 1) and `vicuna_v1` (stage 2 / chat).

The prompt strings are a data format shared with LLaVA checkpoints, so they must match byte for byte.
"""
import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class Conversation:
    system: str
    roles: Tuple[str, str]
    style: str  # "plain" | "two" (vicuna_v1)
    sep: str
    sep2: Optional[str] = None
    messages: List[List[Optional[str]]] = field(default_factory=list)
    version: str = "unknown"

    def append_message(self, role: str, message: Optional[str]):
        if role not in self.roles:
            raise ValueError(f"role {role!r} is not one of {self.roles}")
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        if self.style == "two":
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, message) in enumerate(self.messages):
                out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
            return out
        if self.style == "plain":
            out = self.system
            for role, message in self.messages:
                if message:
                    out += message + self.sep
            return out
        raise ValueError(f"unknown separator style {self.style!r}")

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)

    @property
    def stop_str(self) -> str:
        return self.sep2 if self.style == "two" else self.sep


conv_vicuna_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"), style="two", sep=" ", sep2="</s>", version="v1",
)
conv_plain = Conversation(system="", roles=("", ""), style="plain", sep="\n", version="plain")

conv_templates = {
    "plain": conv_plain,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_vicuna_v1,
}
default_conversation = conv_vicuna_v1


def get_conv_template(name: str) -> Conversation:
    if name not in conv_templates:
        raise ValueError(f"unknown conversation template {name!r}; available: {sorted(conv_templates)}")
    return conv_templates[name].copy()
