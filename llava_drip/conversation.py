"""Conversation templates in LLaVA's formats, with LLaVA's `Conversation` API.

Adapted from haotian-liu/LLaVA llava/conversation.py (Apache-2.0), commit c121f04. Every template of
LLaVA's `conv_templates` is here under the same name, and `get_prompt()` renders the same string byte
for byte: the prompt is a data format shared with LLaVA checkpoints. Training-time label masking for
these templates lives in llava_drip/train/data.py.

LLaVA-NeXT's templates for the Qwen2 LLMs (`qwen_1_5`, `qwen_2`; ChatML with <|im_start|> / <|im_end|>)
sit in `next_conv_templates`, beside LLaVA-1.5's `conv_templates`; `get_conv_template` reads both.

A message is a string, None (the open assistant turn a prompt for generation ends with), or, for a
first user turn that carries an image, a tuple ``(text, PIL.Image, image_process_mode)`` as LLaVA's
Gradio demo builds it; ``image_process_mode`` is one of "Pad", "Default", "Crop", "Resize".
"""
import base64
import dataclasses
from enum import Enum, auto
from io import BytesIO
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from llava_drip.constants import DEFAULT_IMAGE_TOKEN
from llava_drip.mm_utils import expand2square

Message = Union[str, None, Tuple[str, Image.Image, str]]


class SeparatorStyle(Enum):
    """How `Conversation.get_prompt` joins the system text, roles and messages."""
    SINGLE = auto()  # system###Role: msg###Role: msg###
    TWO = auto()  # system<sep>ROLE: msg<sep>ROLE: msg<sep2>  (Vicuna v1)
    MPT = auto()  # system<sep>role-header msg<sep>  (ChatML)
    PLAIN = auto()  # messages only, each followed by a separator (stage-1 captions)
    LLAMA_2 = auto()  # <s>[INST] <<SYS>>...<</SYS>> msg [/INST] answer </s>


@dataclasses.dataclass
class Conversation:
    """A conversation: template fields plus the messages so far (LLaVA's field order and defaults).

    `offset` is the number of leading example messages a template ships (v0 has 2); `get_prompt`
    renders them, the chat views (`get_images`, `to_gradio_chatbot`) skip them.
    """
    system: str
    roles: Tuple[str, str]
    messages: Sequence[Sequence[Any]]  # [[role, Message], ...]; a template's own are a tuple: copy() first
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: Optional[str] = None
    version: str = "Unknown"
    skip_next: bool = False

    # ---- prompt ----------------------------------------------------------------------------------------
    def _text_messages(self) -> List[Tuple[str, str, bool]]:
        """(role, text, present) as rendered: an image in the first message becomes LLaVA's image marker.

        `present` is the truth value of the message itself (a tuple is always present, as in LLaVA);
        an absent message (None or "") leaves its role header open.
        """
        messages = [tuple(m) for m in self.messages]
        if messages and isinstance(messages[0][1], tuple):
            role, first = messages[0]
            text = first[0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                messages[0] = (role, text)
                messages[0:0] = [(self.roles[0], "<Image><image></Image>"), (self.roles[1], "Received.")]
            else:
                messages[0] = (role, DEFAULT_IMAGE_TOKEN + "\n" + text)
        return [(role, msg[0] if isinstance(msg, tuple) else msg, bool(msg)) for role, msg in messages]

    def get_prompt(self) -> str:
        """The prompt string; a trailing None message leaves the assistant header open for generation."""
        messages = self._text_messages()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, msg, present in messages:
                out += f"{role}: {msg}{self.sep}" if present else f"{role}:"
        elif style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, msg, present) in enumerate(messages):
                out += f"{role}: {msg}{seps[i % 2]}" if present else f"{role}:"
        elif style == SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, msg, present in messages:
                out += f"{role}{msg}{self.sep}" if present else role
        elif style == SeparatorStyle.LLAMA_2:
            out = self._llama_2_prompt(messages)
        elif style == SeparatorStyle.PLAIN:
            # LLaVA's plain template has sep2=None and then fails on an answer (str + None); use sep
            seps = (self.sep, self.sep if self.sep2 is None else self.sep2)
            out = self.system
            for i, (_, msg, present) in enumerate(messages):
                if present:
                    out += msg + seps[i % 2]
        else:
            raise ValueError(f"unknown separator style {style!r}; use one of {[s.name for s in SeparatorStyle]}")
        return out

    def _llama_2_prompt(self, messages: List[Tuple[str, str, bool]]) -> str:
        if not messages or not messages[0][2] or messages[0][0] != self.roles[0]:
            raise ValueError(f"a {self.sep_style.name} prompt must start with a non-empty {self.roles[0]} message")
        out = ""
        for i, (_, msg, present) in enumerate(messages):
            if not present:
                continue
            if i == 0 and self.system:
                msg = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + msg
            if i % 2 == 0:
                out += f"{self.sep}[INST] {msg} [/INST]"
            else:
                out += f" {msg} {self.sep2}"
        return out.lstrip(self.sep)  # LLaVA strips the leading sep as a character set; "[" is never in it

    @property
    def stop_str(self) -> str:
        """The string that ends an answer in LLaVA's serving code (sep2 for TWO, sep otherwise).

        An MPT sep that carries the newline between turns (qwen: "<|im_end|>\n") stops at its marker."""
        if self.sep_style == SeparatorStyle.TWO:
            return self.sep2
        if self.sep_style == SeparatorStyle.MPT:
            return self.sep.strip() or self.sep
        return self.sep

    @property
    def style(self) -> str:
        """Read-only lower-case name of `sep_style` ("two", "plain", ...), kept for older callers."""
        return self.sep_style.name.lower()

    # ---- messages ---------------------------------------------------------------------------------------
    def append_message(self, role: str, message: Message) -> None:
        if role not in self.roles:
            raise ValueError(f"role {role!r} is not one of {self.roles}")
        if isinstance(self.messages, tuple):
            raise TypeError("this is a template (its messages are a tuple): append to a copy, "
                            "e.g. conv_templates[name].copy() or get_conv_template(name)")
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        """A new conversation with its own message list (images are shared; skip_next resets, as in LLaVA)."""
        return Conversation(system=self.system, roles=self.roles, messages=[[r, m] for r, m in self.messages],
                            offset=self.offset, sep_style=self.sep_style, sep=self.sep, sep2=self.sep2,
                            version=self.version)

    def _user_images(self):
        """(text, image, mode) of every user message after the offset that carries an image."""
        for i, (_, msg) in enumerate(self.messages[self.offset:]):
            if i % 2 == 0 and isinstance(msg, tuple):
                yield msg

    def dict(self) -> Dict[str, Any]:
        """JSON-friendly view (LLaVA's keys); image messages keep only their text."""
        has_images = any(True for _ in self._user_images())
        messages = [[r, m[0] if isinstance(m, tuple) else m] for r, m in self.messages] if has_images \
            else self.messages
        return {"system": self.system, "roles": self.roles, "messages": messages, "offset": self.offset,
                "sep": self.sep, "sep2": self.sep2}

    # ---- images (LLaVA's Gradio demo) ---------------------------------------------------------------------
    @staticmethod
    def process_image(image: Image.Image, image_process_mode: str, return_pil: bool = False,
                      image_format: str = "PNG", max_len: int = 1344, min_len: int = 672) -> Union[Image.Image, str]:
        """Pad/crop/resize as the demo does, shrink if the long side exceeds max_len; PIL or base64 string."""
        if image_process_mode == "Pad":
            image = expand2square(image, (122, 116, 104))  # the demo's pad colour
        elif image_process_mode == "Resize":
            image = image.resize((336, 336))
        elif image_process_mode not in ("Default", "Crop"):
            raise ValueError(f"invalid image_process_mode {image_process_mode!r}; "
                             "use one of 'Pad', 'Default', 'Crop', 'Resize'")
        if max(image.size) > max_len:
            long_side, short_side = max(image.size), min(image.size)
            aspect = long_side / short_side
            shortest = int(min(max_len / aspect, min_len, short_side))
            longest = int(shortest * aspect)
            w, h = image.size
            image = image.resize((shortest, longest) if h > w else (longest, shortest))
        if return_pil:
            return image
        buf = BytesIO()
        image.save(buf, format=image_format)
        return base64.b64encode(buf.getvalue()).decode()

    def get_images(self, return_pil: bool = False) -> List[Union[Image.Image, str]]:
        """The user images after `offset`, processed for display: PIL images, or base64 PNG strings."""
        return [self.process_image(image, mode, return_pil=return_pil) for _, image, mode in self._user_images()]

    def to_gradio_chatbot(self) -> List[List[Optional[str]]]:
        """[[user, assistant], ...] pairs after `offset`; an image becomes an inline JPEG <img> tag."""
        out: List[List[Optional[str]]] = []
        for i, (_, msg) in enumerate(self.messages[self.offset:]):
            if i % 2:
                out[-1][-1] = msg
                continue
            if isinstance(msg, tuple):
                text, image, _ = msg
                b64 = self.process_image(image, "Default", return_pil=False, image_format="JPEG")
                tag = f'<img src="data:image/jpeg;base64,{b64}" alt="user upload image" />'
                msg = tag + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            out.append([msg, None])
        return out


# ---- templates: names, strings and fields exactly as in LLaVA ---------------------------------------------
conv_vicuna_v0 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("Human", "Assistant"),
    messages=(
        ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
        ("Assistant",
            "Renewable energy sources are those that can be replenished naturally in a relatively "
            "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
            "Non-renewable energy sources, on the other hand, are finite and will eventually be "
            "depleted, such as coal, oil, and natural gas. Here are some key differences between "
            "renewable and non-renewable energy sources:\n"
            "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
            "energy sources are finite and will eventually run out.\n"
            "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
            "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
            "and other negative effects.\n"
            "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
            "have lower operational costs than non-renewable sources.\n"
            "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
            "locations than non-renewable sources.\n"
            "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
            "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
            "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
            "non-renewable sources are not, and their depletion can lead to economic and social instability.\n")
    ),
    offset=2, sep_style=SeparatorStyle.SINGLE, sep="###",
)

conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"), version="v1", messages=(), offset=0,
    sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>",
)

conv_llama_2 = Conversation(
    system="You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
           "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
           "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
           "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
           "instead of answering something not correct. If you don't know the answer to a question, please "
           "don't share false information.",
    roles=("USER", "ASSISTANT"), version="llama_v2", messages=(), offset=0,
    sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
           "You are able to understand the visual content that the user provides, "
           "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"), version="llama_v2", messages=(), offset=0,
    sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
           "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt", messages=(), offset=0,
    sep_style=SeparatorStyle.MPT, sep="<|im_end|>",
)

conv_llava_plain = Conversation(
    system="", roles=("", ""), messages=(), offset=0, sep_style=SeparatorStyle.PLAIN, sep="\n",
)

conv_llava_v0 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("Human", "Assistant"), messages=(), offset=0, sep_style=SeparatorStyle.SINGLE, sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant is able to understand the visual content that the user provides, and assist the user "
           "with a variety of tasks using natural language."
           "The visual content will be provided with the following format: <Image>visual content</Image>.",
    roles=("Human", "Assistant"), messages=(), offset=0, sep_style=SeparatorStyle.SINGLE, sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"), version="v1", messages=(), offset=0,
    sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant is able to understand the visual content that the user provides, and assist the user "
           "with a variety of tasks using natural language."
           "The visual content will be provided with the following format: <Image>visual content</Image>.",
    roles=("USER", "ASSISTANT"), messages=(), offset=0, sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>",
    version="v1_mmtag",
)

conv_mistral_instruct = Conversation(
    system="", roles=("USER", "ASSISTANT"), version="llama_v2", messages=(), offset=0,
    sep_style=SeparatorStyle.LLAMA_2, sep="", sep2="</s>",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt", messages=(), offset=0,
    sep_style=SeparatorStyle.MPT, sep="<|im_end|>",
)

conv_plain = conv_llava_plain  # older name in this project
default_conversation = conv_vicuna_v1
conv_templates: Dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}

# ---- LLaVA-NeXT's templates for the newer LLMs ------------------------------------------------------------
# LLaVA-NeXT renders Qwen's ChatML with its CHATML style: system + sep + "\n", then role + "\n" + message
# + sep + "\n" per turn, role + "\n" for the open turn. MPT with the newline folded into the roles and
# sep renders the same string byte for byte. Labels: data.py's per-role rule (version "qwen").
conv_qwen = Conversation(
    system="<|im_start|>system\nYou are a helpful assistant.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="qwen", messages=(), offset=0,
    sep_style=SeparatorStyle.MPT, sep="<|im_end|>\n",
)

next_conv_templates: Dict[str, Conversation] = {
    "qwen_1_5": conv_qwen,
    "qwen_2": conv_qwen,
    "llava_mistral_instruct": conv_mistral_instruct,  # LLaVA-NeXT's alias
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the named template (LLaVA's or LLaVA-NeXT's); ValueError naming the valid ones otherwise."""
    template = conv_templates.get(name) or next_conv_templates.get(name)
    if template is None:
        raise ValueError(f"unknown conversation template {name!r}; available: "
                         f"{sorted(conv_templates) + sorted(next_conv_templates)}")
    return template.copy()
