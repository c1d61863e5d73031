"""Conversation templates: every LLaVA template name renders LLaVA's prompt byte for byte; the API.

The expected prompts are written out by hand from LLaVA's templates (haotian-liu/LLaVA
llava/conversation.py @c121f04); the system texts below are copies of LLaVA's, as they are a data format.
"""
import base64
import io

import pytest
from PIL import Image

from llava_drip import conversation as convlib
from llava_drip.conversation import Conversation, SeparatorStyle, conv_templates, get_conv_template

SYS_USER = ("A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYS_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYS_MMTAG = ("A chat between a curious user and an artificial intelligence assistant. The assistant is able to "
             "understand the visual content that the user provides, and assist the user with a variety of tasks "
             "using natural language.The visual content will be provided with the following format: "
             "<Image>visual content</Image>.")
SYS_LLAMA_2 = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
               "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
               "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
               "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, "
               "explain why instead of answering something not correct. If you don't know the answer to a "
               "question, please don't share false information.")
SYS_LLAVA_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                     "that the user provides, and assist the user with a variety of tasks using natural language.")
SYS_MPT = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
           "The assistant gives helpful and honest answers.")
SYS_CHATML = "<|im_start|>system\nAnswer the questions."
V0_Q = "What are the key differences between renewable and non-renewable energy sources?"
V0_A = ("Renewable energy sources are those that can be replenished naturally in a relatively short amount of "
        "time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other "
        "hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key "
        "differences between renewable and non-renewable energy sources:\n1. Availability: Renewable energy "
        "sources are virtually inexhaustible, while non-renewable energy sources are finite and will eventually "
        "run out.\n2. Environmental impact: Renewable energy sources have a much lower environmental impact than "
        "non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other "
        "negative effects.\n3. Cost: Renewable energy sources can be more expensive to initially set up, but they "
        "typically have lower operational costs than non-renewable sources.\n4. Reliability: Renewable energy "
        "sources are often more reliable and can be used in more remote locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n6. Sustainability: "
        "Renewable energy sources are more sustainable over the long term, while non-renewable sources are not, "
        "and their depletion can lead to economic and social instability.\n")
V0_HEAD = f"{SYS_HUMAN}###Human: {V0_Q}###Assistant: {V0_A}###"

LLAVA_NAMES = {"default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "chatml_direct", "mistral_direct",
               "plain", "v0_plain", "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt"}

IMG = Image.new("RGB", (40, 30), (200, 10, 10))

# conversations, given as (user, assistant) text pairs; None = the open turn a generation prompt ends with
ONE = [("Hello", None)]
MULTI = [("Q1", "A1"), ("Q2", None)]
FULL = [("<image>\nWhat is 2+2?", "4"), ("And 3+3?", "6")]
IMAGE = [(("What is this?<image>", IMG, "Default"), None)]  # the demo's (text, image, mode) first message

L2 = f"[INST] <<SYS>>\n{SYS_LLAMA_2}\n<</SYS>>\n\n"
LL2 = f"[INST] <<SYS>>\n{SYS_LLAVA_LLAMA_2}\n<</SYS>>\n\n"
EXPECTED = {
    "v1": {
        "one": f"{SYS_USER} USER: Hello ASSISTANT:",
        "multi": f"{SYS_USER} USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
        "full": f"{SYS_USER} USER: <image>\nWhat is 2+2? ASSISTANT: 4</s>USER: And 3+3? ASSISTANT: 6</s>",
        "image": f"{SYS_USER} USER: <image>\nWhat is this? ASSISTANT:",
    },
    "llava_v1": {
        "one": f"{SYS_HUMAN} USER: Hello ASSISTANT:",
        "multi": f"{SYS_HUMAN} USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
        "full": f"{SYS_HUMAN} USER: <image>\nWhat is 2+2? ASSISTANT: 4</s>USER: And 3+3? ASSISTANT: 6</s>",
        "image": f"{SYS_HUMAN} USER: <image>\nWhat is this? ASSISTANT:",
    },
    "v1_mmtag": {
        "one": f"{SYS_MMTAG} USER: Hello ASSISTANT:",
        "multi": f"{SYS_MMTAG} USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
        "full": f"{SYS_MMTAG} USER: <image>\nWhat is 2+2? ASSISTANT: 4</s>USER: And 3+3? ASSISTANT: 6</s>",
        # the image becomes an exchange of its own, before the question
        "image": f"{SYS_MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is this? ASSISTANT:",
    },
    "llava_v0": {
        "one": f"{SYS_HUMAN}###Human: Hello###Assistant:",
        "multi": f"{SYS_HUMAN}###Human: Q1###Assistant: A1###Human: Q2###Assistant:",
        "full": f"{SYS_HUMAN}###Human: <image>\nWhat is 2+2?###Assistant: 4###Human: And 3+3?###Assistant: 6###",
        "image": f"{SYS_HUMAN}###Human: <image>\nWhat is this?###Assistant:",
    },
    "v0_mmtag": {
        "one": f"{SYS_MMTAG}###Human: Hello###Assistant:",
        "multi": f"{SYS_MMTAG}###Human: Q1###Assistant: A1###Human: Q2###Assistant:",
        "full": f"{SYS_MMTAG}###Human: <image>\nWhat is 2+2?###Assistant: 4###Human: And 3+3?###Assistant: 6###",
        "image": f"{SYS_MMTAG}###Human: <Image><image></Image>###Assistant: Received.###Human: What is this?###Assistant:",
    },
    "v0": {  # two example messages first (offset 2); the image rule looks at the first message only
        "one": f"{V0_HEAD}Human: Hello###Assistant:",
        "multi": f"{V0_HEAD}Human: Q1###Assistant: A1###Human: Q2###Assistant:",
        "full": f"{V0_HEAD}Human: <image>\nWhat is 2+2?###Assistant: 4###Human: And 3+3?###Assistant: 6###",
        "image": f"{V0_HEAD}Human: What is this?<image>###Assistant:",
    },
    "llama_2": {
        "one": f"{L2}Hello [/INST]",
        "multi": f"{L2}Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]",
        "full": f"{L2}<image>\nWhat is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] 6 </s>",
        "image": f"{L2}<image>\nWhat is this? [/INST]",
    },
    "llava_llama_2": {
        "one": f"{LL2}Hello [/INST]",
        "multi": f"{LL2}Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]",
        "full": f"{LL2}<image>\nWhat is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] 6 </s>",
        "image": f"{LL2}<image>\nWhat is this? [/INST]",
    },
    "mistral_instruct": {  # empty system: no <<SYS>> block; empty sep: nothing between rounds
        "one": "[INST] Hello [/INST]",
        "multi": "[INST] Q1 [/INST] A1 </s>[INST] Q2 [/INST]",
        "full": "[INST] <image>\nWhat is 2+2? [/INST] 4 </s>[INST] And 3+3? [/INST] 6 </s>",
        "image": "[INST] <image>\nWhat is this? [/INST]",
    },
    "mpt": {
        "one": f"{SYS_MPT}<|im_end|><|im_start|>user\nHello<|im_end|><|im_start|>assistant\n",
        "multi": f"{SYS_MPT}<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
                 "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
        "full": f"{SYS_MPT}<|im_end|><|im_start|>user\n<image>\nWhat is 2+2?<|im_end|><|im_start|>assistant\n4"
                "<|im_end|><|im_start|>user\nAnd 3+3?<|im_end|><|im_start|>assistant\n6<|im_end|>",
        "image": f"{SYS_MPT}<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n",
    },
    "chatml_direct": {
        "one": f"{SYS_CHATML}<|im_end|><|im_start|>user\nHello<|im_end|><|im_start|>assistant\n",
        "multi": f"{SYS_CHATML}<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
                 "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
        "full": f"{SYS_CHATML}<|im_end|><|im_start|>user\n<image>\nWhat is 2+2?<|im_end|><|im_start|>assistant\n4"
                "<|im_end|><|im_start|>user\nAnd 3+3?<|im_end|><|im_start|>assistant\n6<|im_end|>",
        "image": f"{SYS_CHATML}<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n",
    },
    "plain": {  # LLaVA's plain has sep2=None and raises on an answer (str + None); here sep ends every message
        "one": "Hello\n",
        "multi": "Q1\nA1\nQ2\n",
        "full": "<image>\nWhat is 2+2?\n4\nAnd 3+3?\n6\n",
        "image": "<image>\nWhat is this?\n",
    },
}
ALIASES = {"vicuna_v1": "v1", "default": "v0", "mistral_direct": "chatml_direct", "v0_plain": "plain"}
CASES = {"one": ONE, "multi": MULTI, "full": FULL, "image": IMAGE}


def _conv(name, pairs):
    conv = get_conv_template(name)
    for user, assistant in pairs:
        conv.append_message(conv.roles[0], user)
        conv.append_message(conv.roles[1], assistant)
    return conv


def test_every_llava_template_name_is_here():
    assert set(conv_templates) == LLAVA_NAMES
    assert set(EXPECTED) | set(ALIASES) == LLAVA_NAMES
    for alias, name in ALIASES.items():
        assert conv_templates[alias] is conv_templates[name]
    assert convlib.default_conversation is conv_templates["vicuna_v1"]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(LLAVA_NAMES))
def test_get_prompt_matches_llava(name, case):
    assert _conv(name, CASES[case]).get_prompt() == EXPECTED[ALIASES.get(name, name)][case]


def test_template_fields():
    v1 = conv_templates["vicuna_v1"]
    assert (v1.roles, v1.sep_style, v1.sep, v1.sep2, v1.version, v1.offset) == (
        ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>", "v1", 0)
    assert v1.system == SYS_USER and "human" not in v1.system  # LLaVA-1.5's system text
    assert conv_templates["llava_v1"].system == SYS_HUMAN
    assert conv_templates["v0"].offset == 2 and len(conv_templates["v0"].messages) == 2
    assert conv_templates["plain"].sep2 is None and conv_templates["plain"].sep_style == SeparatorStyle.PLAIN
    assert [conv_templates[n].version for n in ("llama_2", "mistral_instruct", "mpt", "chatml_direct", "v0")] == [
        "llama_v2", "llama_v2", "mpt", "mpt", "Unknown"]
    assert [s.name for s in SeparatorStyle] == ["SINGLE", "TWO", "MPT", "PLAIN", "LLAMA_2"]


def test_stop_str_and_style_alias():
    stops = {n: get_conv_template(n).stop_str for n in ("v1", "plain", "llama_2", "mistral_instruct", "mpt", "v0")}
    assert stops == {"v1": "</s>", "plain": "\n", "llama_2": "<s>", "mistral_instruct": "", "mpt": "<|im_end|>",
                     "v0": "###"}
    conv = get_conv_template("v1")
    assert conv.style == "two" and get_conv_template("plain").style == "plain"
    with pytest.raises(AttributeError):
        conv.style = "plain"


def test_copy_is_independent_of_template_and_original():
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", "hi")
    assert conv_templates["vicuna_v1"].messages == ()
    other = conv.copy()
    other.append_message("ASSISTANT", "hello")
    other.messages[0][1] = "changed"
    assert conv.messages == [["USER", "hi"]]
    assert other.messages == [["USER", "changed"], ["ASSISTANT", "hello"]]
    conv.skip_next = True
    assert conv.copy().skip_next is False  # as in LLaVA's copy()
    v0 = get_conv_template("v0")
    assert v0.messages == [["Human", V0_Q], ["Assistant", V0_A]] and v0.offset == 2


def test_append_message_errors():
    with pytest.raises(TypeError, match="copy"):
        conv_templates["vicuna_v1"].append_message("USER", "hi")
    with pytest.raises(ValueError, match="'human' is not one of"):
        get_conv_template("vicuna_v1").append_message("human", "hi")
    with pytest.raises(ValueError, match=r"unknown conversation template 'vicuna'; available: \['chatml_direct'"):
        get_conv_template("vicuna")


def test_llama_2_needs_a_first_user_message():
    conv = get_conv_template("llama_2")
    conv.append_message("ASSISTANT", "hi")
    with pytest.raises(ValueError, match="must start with a non-empty USER message"):
        conv.get_prompt()


def test_empty_message_leaves_the_role_open_like_none():
    conv = _conv("v1", [("Q", "")])
    assert conv.get_prompt() == f"{SYS_USER} USER: Q ASSISTANT:"


def test_dict():
    conv = _conv("v1", [("hi", "hello")])
    assert conv.dict() == {"system": SYS_USER, "roles": ("USER", "ASSISTANT"),
                           "messages": [["USER", "hi"], ["ASSISTANT", "hello"]], "offset": 0, "sep": " ",
                           "sep2": "</s>"}
    with_image = _conv("v1", [(("<image>\nWhat?", IMG, "Pad"), "Red.")])
    assert with_image.dict()["messages"] == [["USER", "<image>\nWhat?"], ["ASSISTANT", "Red."]]


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_get_images_modes_and_resizing():
    conv = _conv("v1", [(("<image>\nWhat?", IMG, "Pad"), "Red."), ("More?", None)])
    (pil,) = conv.get_images(return_pil=True)
    assert pil.size == (40, 40) and pil.getpixel((0, 0)) == (122, 116, 104)  # LLaVA's demo pad colour
    (b64,) = conv.get_images()
    assert _decode(b64).format == "PNG" and _decode(b64).size == (40, 40)
    big = Image.new("RGB", (2000, 1000))
    assert _conv("v1", [(("x", big, "Default"), None)]).get_images(return_pil=True)[0].size == (1344, 672)
    tall = Image.new("RGB", (500, 3000))
    # shortest edge min(1344 / 6, 672, 500) = 224, longest 224 * 6
    assert _conv("v1", [(("x", tall, "Crop"), None)]).get_images(return_pil=True)[0].size == (224, 1344)
    assert _conv("v1", [(("x", IMG, "Resize"), None)]).get_images(return_pil=True)[0].size == (336, 336)
    with pytest.raises(ValueError, match="invalid image_process_mode 'Stretch'"):
        _conv("v1", [(("x", IMG, "Stretch"), None)]).get_images()


def test_to_gradio_chatbot_and_offset():
    conv = _conv("v1", [(("What is this?<image>", IMG, "Pad"), "A red square."), ("Sure?", None)])
    chat = conv.to_gradio_chatbot()
    assert len(chat) == 2 and chat[1] == ["Sure?", None]
    head, tail = chat[0][0].split('" alt="user upload image" />')
    assert head.startswith('<img src="data:image/jpeg;base64,') and tail == "What is this?"
    assert _decode(head.split(",", 1)[1]).size == (40, 30)  # "Default" mode: no padding for display
    assert chat[0][1] == "A red square."
    # v0's two example messages are part of the prompt but not of the chat view
    v0 = _conv("v0", [("Hello", "Hi!")])
    assert v0.to_gradio_chatbot() == [["Hello", "Hi!"]]
    assert v0.get_images() == [] and v0.get_prompt() == f"{V0_HEAD}Human: Hello###Assistant: Hi!###"


def test_constructor_keeps_llava_field_order():
    conv = Conversation("sys", ("A", "B"), [], 0, SeparatorStyle.TWO, " ", "<end>", "v1")
    conv.append_message("A", "x")
    conv.append_message("B", None)
    assert conv.get_prompt() == "sys A: x B:"
    assert Conversation("s", ("A", "B"), (), 0).sep == "###"  # LLaVA's defaults
