"""Role templates (docs/algorithm.md, "Templates"), the slhf.json manifest, weights resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slhf_models.serving.loading import resolve_weights
from slhf_models.serving.manifest import Manifest, ManifestError, RoleSpec
from slhf_models.serving.templates import (
    DEFAULT_FOLLOWER_INSTRUCTION,
    TemplateConfig,
    TemplateError,
    TemplateRenderer,
    follower_messages,
    leader_messages,
)
from tests.fakes import CharTokenizer


class PlainTokenizer(CharTokenizer):
    chat_template = None


# -- templates ---------------------------------------------------------------------------------
def test_leader_and_follower_messages_follow_the_paper() -> None:
    assert leader_messages("x?") == [{"role": "user", "content": "x?"}]
    assert follower_messages("x?", "y.") == [
        {"role": "user", "content": "x?"},
        {"role": "assistant", "content": "y."},
        {"role": "user", "content": DEFAULT_FOLLOWER_INSTRUCTION},
    ]
    assert DEFAULT_FOLLOWER_INSTRUCTION == (
        "Improve the previous answer. Phrase it as if it was the original response."
    )


def test_conversations_keep_their_turns_before_the_answer() -> None:
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    msgs = follower_messages(convo, "a", "improve")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


def test_chat_layout_uses_the_tokenizer_template() -> None:
    r = TemplateRenderer(CharTokenizer(), TemplateConfig(follower_instruction="Do better."))
    assert r.uses_chat
    assert r.render_leader("Q") == "<|user|>Q\n<|assistant|>"
    assert (
        r.render_follower("Q", "A")
        == "<|user|>Q\n<|assistant|>A\n<|user|>Do better.\n<|assistant|>"
    )
    assert r.encode_role("leader", "Q", None) == [ord(c) for c in "<|user|>Q\n<|assistant|>"]


def test_plain_layout_concatenates_prompt_answer_instruction() -> None:
    r = TemplateRenderer(PlainTokenizer())
    assert not r.uses_chat
    assert r.render_leader("Q") == "Q\n\n"
    assert r.render_follower("Q", "A") == f"Q\n\nA\n\n{DEFAULT_FOLLOWER_INSTRUCTION}\n\n"
    # the forced plain layout ignores a chat template
    forced = TemplateRenderer(CharTokenizer(), TemplateConfig(layout="plain", plain_separator="|"))
    assert forced.render_follower("Q", "A") == f"Q|A|{DEFAULT_FOLLOWER_INSTRUCTION}|"


def test_chat_layout_without_a_chat_template_is_an_error() -> None:
    with pytest.raises(TemplateError, match="no chat_template"):
        TemplateRenderer(PlainTokenizer(), TemplateConfig(layout="chat"))


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ("  ", "must not be empty"),
        ([], "at least one message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "tool", "content": "a"}], "messages[0].role"),
        ([{"role": "system", "content": "a"}, {"role": "user", "content": " "}], "non-empty user"),
    ],
)
def test_bad_prompts_are_rejected(prompt: object, fragment: str) -> None:
    with pytest.raises(TemplateError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        leader_messages(prompt)  # type: ignore[arg-type]


# -- manifest ----------------------------------------------------------------------------------
def test_manifest_round_trips_and_derives_topology(tmp_path: Path) -> None:
    m = Manifest(name="m", follower=RoleSpec(adapter="follower-lora"), default_rounds=3)
    assert m.topology == "lora"
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m
    assert Manifest(name="m").topology == "shared"
    assert Manifest(name="m", follower=RoleSpec(model="other/model")).topology == "separate"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"name": "m", "format_version": 9}, "format_version 9 is not supported"),
        ({"name": "m", "default_rounds": -1}, "default_rounds"),
        ({"name": "m", "leader": {"sampling": {"temperature": -2}}}, "leader.sampling.temperature"),
        ({"name": "m", "follower": {"adaptor": "x"}}, "follower.adaptor"),
        ({"name": "bad name!"}, "name"),
        ({"name": "m", "follower": {"model": "o/m", "adapter": "a"}}, "adapters with separate"),
        ([], "must be a JSON object"),
    ],
)
def test_invalid_manifests_say_what_is_wrong(tmp_path: Path, raw: object, fragment: str) -> None:
    (tmp_path / "slhf.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=fragment) as e:
        Manifest.load(tmp_path)
    assert str(tmp_path / "slhf.json") in str(e.value)


def test_manifest_that_is_not_json_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "slhf.json").write_text('{\n "name": }')
    with pytest.raises(ManifestError, match="not valid JSON \\(line 2"):
        Manifest.load(tmp_path)


# -- weights resolution ------------------------------------------------------------------------
def test_plain_folder_is_served_shared_with_the_papers_template(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    w = resolve_weights(folder)
    assert (w.name, w.topology) == ("my-model", "shared")
    assert w.leader.model == w.follower.model == str(folder.resolve())
    assert w.manifest.template.follower_instruction == DEFAULT_FOLLOWER_INSTRUCTION


def test_adapters_resolve_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "follower-lora").mkdir()
    Manifest(name="m", follower=RoleSpec(adapter="follower-lora")).save(tmp_path)
    w = resolve_weights(tmp_path)
    assert w.topology == "lora" and w.leader.adapter is None
    assert w.follower.adapter == str((tmp_path / "follower-lora").resolve())


def test_missing_adapter_folder_is_an_error(tmp_path: Path) -> None:
    Manifest(name="m", follower=RoleSpec(adapter="./missing-lora")).save(tmp_path)
    with pytest.raises(ManifestError, match="missing-lora"):
        resolve_weights(tmp_path)


def test_follower_model_setting_makes_two_engines(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    w = resolve_weights(a, follower_model=str(b), served_model_name="pair")
    assert (w.name, w.topology) == ("pair", "separate")
    assert (w.leader.model, w.follower.model) == (str(a.resolve()), str(b.resolve()))


def test_topology_setting_must_agree_with_the_model(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"SLHF_TOPOLOGY=lora but .* topology 'shared'"):
        resolve_weights(tmp_path, topology="lora")


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such model folder"):
        resolve_weights(tmp_path / "nope")
