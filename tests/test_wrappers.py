"""Reply parsing, LLMActionWrapper and AnchorStateWrapper, on a tiny text env defined here."""

from __future__ import annotations

import gymnasium as gym
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings, strategies as st

from gigpo_rllib.anchors import anchor_id
from gigpo_rllib.wrappers import ActionStepError, AnchorStateWrapper, LLMActionWrapper, parse_answer

WORDS = ("Left", "Down", "Right", "Up")


class CorridorEnv(gym.Env):
    """A player on a 1-D corridor of ``length`` cells; the observation text carries a volatile turn counter."""

    metadata = {"render_modes": []}
    action_words = ("Back", "Forward")
    instructions = "Walk to the end of the corridor."

    def __init__(self, length: int = 4, max_steps: int = 6):
        self.length, self.max_steps = length, max_steps
        self.action_space = spaces.Discrete(2)
        self.observation_space = spaces.Text(64, charset=frozenset("corridor:#.P turn0123456789\n"))

    def _text(self) -> str:
        cells = "".join("P" if i == self.position else "." for i in range(self.length))
        return f"corridor: {cells}\nturn {self.turn}"

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position, self.turn = 0, 0
        return self._text(), {}

    def step(self, action):
        self.position = min(max(self.position + (1 if action == 1 else -1), 0), self.length - 1)
        self.turn += 1
        terminated = self.position == self.length - 1
        truncated = not terminated and self.turn >= self.max_steps
        info = {"success": terminated} if terminated or truncated else {}
        return self._text(), float(terminated), terminated, truncated, info


def drop_turn_counter(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not line.startswith("turn"))


# ---------------------------------------------------------------- parse_answer


@pytest.mark.parametrize(
    "reply, action",
    [
        ("<answer>Up</answer>", "Up"),
        ("<answer>  up \n</answer>", "Up"),
        ("<ANSWER>LEFT</Answer>", "Left"),
        ("I go right. <answer>Right</answer>", "Right"),
        ("<think>hmm</think><answer>Down</answer>", "Down"),
    ],
)
def test_parse_answer_accepts_one_action_word(reply, action):
    parsed = parse_answer(reply, WORDS)
    assert parsed.is_valid and parsed.action == action and parsed.action_index == WORDS.index(action)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "Up",
        "<answer>upright</answer>",
        "<answer>Up Left</answer>",
        "<answer></answer>",
        "<answer>Up</answer><answer>Up</answer>",
        "<answer><answer>Up</answer></answer>",
        "</answer>Up<answer>",
        "<answer>Up",
        "<anſwer>Up</anſwer>",  # long s is not an ASCII case variant of "s"
    ],
)
def test_parse_answer_rejects_everything_else(reply):
    parsed = parse_answer(reply, WORDS)
    assert not parsed.is_valid and parsed.action is None and parsed.error


def test_parse_answer_never_raises_on_non_strings():
    for reply in (None, 3, b"<answer>Up</answer>", ["<answer>Up</answer>"]):
        assert not parse_answer(reply, WORDS).is_valid


def test_parse_answer_require_think():
    assert parse_answer(" <think>a\nb</think>\n<answer>up</answer> ", WORDS, require_think=True).action == "Up"
    for reply in (
        "<answer>Up</answer>",
        "<answer>Up</answer><think>x</think>",
        "preamble <think>x</think><answer>Up</answer>",
        "<think>x</think><answer>Up</answer> trailing",
        "<think><think>x</think></think><answer>Up</answer>",
    ):
        assert not parse_answer(reply, WORDS, require_think=True).is_valid, reply


def test_parse_answer_free_form():
    assert parse_answer("<answer> [A C] </answer>", None).action == "[A C]"
    assert not parse_answer("<answer>  </answer>", None).is_valid


def test_parse_answer_huge_reply():
    reply = "x" * 2_000_000 + "<answer>Up</answer>" + "<" * 100_000
    assert parse_answer(reply, WORDS).action == "Up"


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def oracle(reply: str, require_think: bool) -> str | None:
    """Independent reference: string methods only, no regular expressions."""
    folded = reply.translate(_ASCII_LOWER)  # same length as reply
    if folded.count("<answer>") != 1 or folded.count("</answer>") != 1:
        return None
    start, end = folded.index("<answer>"), folded.index("</answer>")
    if start > end:
        return None
    if require_think:
        if folded.count("<think>") != 1 or folded.count("</think>") != 1:
            return None
        think_start, think_end = folded.index("<think>"), folded.index("</think>")
        if reply[:think_start].strip() or reply[think_end + len("</think>") : start].strip():
            return None
        if reply[end + len("</answer>") :].strip() or not think_start < think_end < start:
            return None
    content = reply[start + len("<answer>") : end].strip().casefold()
    return next((word for word in WORDS if word.casefold() == content), None)


FRAGMENTS = st.sampled_from(
    ["<answer>", "</answer>", "<ANSWER>", "</Answer>", "<think>", "</think>", "<THINK>", "Up", "up ", " LEFT",
     "upright", "Down\n", "right", "\t", " ", "<", ">", "/", "\u00a0", "ß", "İ", "K"]
)
REPLIES = st.lists(st.one_of(FRAGMENTS, st.text(max_size=8)), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(reply=REPLIES, require_think=st.booleans())
def test_parse_answer_fuzz_matches_reference(reply, require_think):
    parsed = parse_answer(reply, WORDS, require_think=require_think)
    assert parsed.action == oracle(reply, require_think)
    assert parsed.is_valid == (parsed.action is not None)


@settings(max_examples=200, deadline=None)
@given(
    word=st.sampled_from(WORDS),
    case=st.sampled_from([str.lower, str.upper, str.title, str.swapcase]),
    pad=st.text(alphabet=" \t\n", max_size=3),
    outside=st.text(alphabet=st.characters(blacklist_characters="<"), max_size=30),
)
def test_parse_answer_fuzz_valid_format_always_parses(word, case, pad, outside):
    reply = f"{outside}<answer>{pad}{case(word)}{pad}</answer>"
    assert parse_answer(reply, WORDS).action == word
    assert parse_answer(f"<think>{outside}</think>{pad}<answer>{case(word)}</answer>", WORDS, True).action == word


# ---------------------------------------------------------------- LLMActionWrapper


def test_llm_wrapper_valid_and_invalid_steps():
    env = LLMActionWrapper(CorridorEnv(), invalid_action_penalty=-0.5)
    observation, _ = env.reset(seed=0)
    next_observation, reward, terminated, truncated, info = env.step("<answer>forward</answer>")
    assert info["action_is_valid"] and next_observation != observation and reward == 0.0
    same, reward, terminated, truncated, info = env.step("<answer>forwards</answer>")
    assert same == next_observation and reward == -0.5 and not terminated and not truncated
    assert info["action_is_valid"] is False and "forwards" in info["parse_error"]
    assert env.unwrapped.position == 1 and env.unwrapped.turn == 1  # the inner env was not touched


def test_llm_wrapper_tells_an_env_error_on_a_valid_action_apart():
    class RejectingCorridor(CorridorEnv):
        def step(self, action):
            raise KeyError("no such move here")

    env = LLMActionWrapper(RejectingCorridor())
    env.reset(seed=0)
    with pytest.raises(ActionStepError, match="valid action 'Forward'") as raised:
        env.step("<answer>forward</answer>")
    assert raised.value.action == "Forward" and isinstance(raised.value.__cause__, KeyError)
    assert env.step("nonsense")[4]["action_is_valid"] is False  # an invalid reply never reaches the env


def test_llm_wrapper_invalid_replies_use_the_turn_budget():
    env = LLMActionWrapper(CorridorEnv(max_steps=3))
    env.reset(seed=0)
    env.step("<answer>Back</answer>")
    assert env.step("nonsense")[3] is False
    *_, truncated, info = env.step("nonsense")
    assert truncated and info == {"action_is_valid": False, "parse_error": info["parse_error"], "success": False}


def test_llm_wrapper_exposes_words_and_instructions():
    env = LLMActionWrapper(CorridorEnv(), require_think=True)
    assert env.action_words == ("Back", "Forward")
    assert env.instructions.startswith("Walk to the end")
    assert "<think>...</think><answer>Back</answer>" in env.instructions
    assert isinstance(env.action_space, spaces.Text)
    with pytest.raises(ValueError, match="invalid_action_penalty"):
        LLMActionWrapper(CorridorEnv(), invalid_action_penalty="big")


# ---------------------------------------------------------------- AnchorStateWrapper


def test_anchor_wrapper_on_a_text_env_written_here():
    env = AnchorStateWrapper(CorridorEnv(), canonicalize=drop_turn_counter, include_canonical_text=True)
    observation, info = env.reset(seed=0)
    start_anchor = info["anchor_id"]
    assert start_anchor == anchor_id(observation, drop_turn_counter)
    assert info["canonical_observation"] == "corridor: P..."
    _, _, _, _, info = env.step(1)
    forward_anchor = info["anchor_id"]
    assert forward_anchor != start_anchor
    _, _, _, _, info = env.step(0)  # back at the start: same state, different turn counter
    assert info["anchor_id"] == start_anchor and -(2**63) <= start_anchor < 2**63
    plain = AnchorStateWrapper(CorridorEnv())
    _, plain_info = plain.reset(seed=0)
    assert plain_info["anchor_id"] != start_anchor and "canonical_observation" not in plain_info


def test_anchor_wrapper_128_bits_and_bad_args():
    _, info = AnchorStateWrapper(CorridorEnv(), bits=128).reset(seed=0)
    assert 0 <= info["anchor_id"] < 2**128
    with pytest.raises(ValueError, match="bits"):
        AnchorStateWrapper(CorridorEnv(), bits=32)


def test_anchor_wrapper_rejects_non_text_observations():
    with pytest.raises(TypeError, match="Discrete"):
        AnchorStateWrapper(gym.make("FrozenLake-v1"))

    class Unannounced(CorridorEnv):
        def __init__(self, observation):
            super().__init__()
            del self.observation_space
            self.fixed = observation

        def reset(self, *, seed=None, options=None):
            return self.fixed, {}

    assert "anchor_id" in AnchorStateWrapper(Unannounced("plain str")).reset()[1]
    with pytest.raises(TypeError, match="int"):
        AnchorStateWrapper(Unannounced(7)).reset()


def test_wrappers_compose_and_pass_check_env():
    stacked = AnchorStateWrapper(gym.wrappers.TimeLimit(LLMActionWrapper(CorridorEnv()), max_episode_steps=5))
    check_env(stacked, skip_render_check=True)
    check_env(AnchorStateWrapper(CorridorEnv()), skip_render_check=True)
    _, info = stacked.reset(seed=1)
    _, _, _, _, valid = stacked.step("<answer>Forward</answer>")
    _, _, _, _, invalid = stacked.step("<answer>Sideways</answer>")
    assert valid["action_is_valid"] and not invalid["action_is_valid"]
    assert valid["anchor_id"] != info["anchor_id"] and invalid["anchor_id"] == valid["anchor_id"]
    assert stacked.instructions.startswith("Walk") and stacked.action_words == ("Back", "Forward")


class _BareTextEnv(gym.Env):
    """A text env with none of the project's attributes (no instructions, no action_words, no max_steps)."""

    observation_space = spaces.Text(max_length=32)
    action_space = spaces.Text(max_length=32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "a quiet room", {}

    def step(self, action):
        return f"you said {action}", float(action == "hello"), action == "hello", False, {}


def test_an_env_without_instructions_gets_a_generic_prompt_and_free_form_answers():
    from gigpo_rllib.wrappers import GENERIC_INSTRUCTIONS

    env = LLMActionWrapper(_BareTextEnv())
    assert env.instructions.startswith(GENERIC_INSTRUCTIONS) and "<answer>" in env.instructions
    env.reset(seed=0)
    observation, reward, terminated, _, info = env.step("<answer> hello </answer>")
    assert (observation, reward, terminated, info["action_is_valid"]) == ("you said hello", 1.0, True, True)


def test_instructions_override_keeps_the_answer_format():
    env = LLMActionWrapper(_BareTextEnv(), instructions="Greet the room.")
    assert env.instructions.startswith("Greet the room.\n") and "<answer>" in env.instructions
    with pytest.raises(ValueError, match="instructions"):
        LLMActionWrapper(_BareTextEnv(), instructions="  ")
