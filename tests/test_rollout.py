"""The step-sample collector and batch assembly, without Ray: real tiny model, real text envs."""

from collections import defaultdict

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from gigpo_rllib.batch import merge_rollouts, pad_token_batch, shard_rows, take_rows
from gigpo_rllib.advantages import compute_gigpo_advantages
from gigpo_rllib.rl_module import TOKEN_LOGPROBS
from gigpo_rllib.rollout import GroupSpec, PromptBuilder, RolloutSettings, StepCollector
from gigpo_rllib.sampling import make_sampler
from gigpo_rllib.sampling.base import SamplingParams


@pytest.fixture(scope="module")
def sampler():
    return make_sampler("hf", "gigpo-tiny")


def collector(sampler, *, constraint=True, max_envs=16, sequence_length=1024, history_length=2, max_steps=4,
              max_new_tokens=12, anchor_similarity=None, make_env=None):
    """A StepCollector on the bundled envs (``max_steps`` turns each) unless ``make_env`` is given."""
    settings = RolloutSettings(sampling=SamplingParams(max_new_tokens=max_new_tokens), sequence_length=sequence_length,
                               history_length=history_length, max_envs=max_envs, action_constraint=constraint,
                               anchor_similarity=anchor_similarity)
    return StepCollector(sampler, make_env or (lambda tag: envs.make_llm_env(tag, max_steps=max_steps)), settings)


def groups(n, tag="FrozenLake", first_seed=0):
    return [GroupSpec(group_id=i, tag=tag, tag_id=0, seed=first_seed + i) for i in range(n)]


def test_every_turn_becomes_one_sample(sampler):
    out = collector(sampler).collect(groups(2), group_size=3, sample_seed=0)
    episodes = out["episodes"]
    assert len(episodes["return"]) == 6
    assert len(out["rewards"]) == episodes["length"].sum()
    assert sorted(set(out["traj_ids"].tolist())) == list(range(6))
    for traj in range(6):
        steps = out["step_ids"][out["traj_ids"] == traj]
        assert steps.tolist() == list(range(len(steps)))
        assert (out["group_ids"][out["traj_ids"] == traj] == traj // 3).all()
    # Every trajectory ends exactly once, on its last step, and each of its turns carries the episode's outcome.
    assert out["episode_ends"].sum() == 6
    for traj in range(6):
        assert (out["episode_success"][out["traj_ids"] == traj] == episodes["success"][traj]).all()
    assert np.isclose(out["rewards"].sum(), episodes["return"].sum())
    assert len(out["prompt_ids"]) == len(out["response_ids"]) == len(out["response_logprobs"]) == len(out["rewards"])


def test_group_members_start_from_the_same_state(sampler):
    out = collector(sampler).collect(groups(3), group_size=4, sample_seed=1)
    first = out["step_ids"] == 0
    for group in range(3):
        anchors = out["anchor_ids"][first & (out["group_ids"] == group)]
        assert len(anchors) == 4 and len(set(anchors.tolist())) == 1
    starts = {out["anchor_ids"][first & (out["group_ids"] == g)][0] for g in range(3)}
    assert len(starts) == 3  # different seeds, different maps


def test_constraint_gives_only_valid_actions(sampler):
    out = collector(sampler, constraint=True).collect(groups(2), group_size=2, sample_seed=2)
    assert out["action_is_valid"].all()
    unconstrained = collector(sampler, constraint=False).collect(groups(2), group_size=2, sample_seed=2)
    assert not unconstrained["action_is_valid"].all()  # the untrained tiny model babbles


def test_waves_respect_max_envs_and_give_the_same_samples_count(sampler):
    out = collector(sampler, max_envs=2).collect(groups(3), group_size=2, sample_seed=3)
    assert len(out["episodes"]["return"]) == 6


def test_history_and_truncation(sampler):
    tokenizer = sampler.tokenizer
    builder = PromptBuilder(tokenizer, sequence_length=1024, max_new_tokens=12, history_length=2)
    history = [(f"state {k}", f"<answer>Up</answer> {k}") for k in range(4)]
    ids, truncated = builder.build("rules", history, "now")
    text = tokenizer.decode(ids)
    assert "state 3" in text and "state 2" in text and "state 1" not in text and not truncated
    short = len(builder.build("rules", [], "now")[0])
    tight = PromptBuilder(tokenizer, sequence_length=short + 12 + 5, max_new_tokens=12, history_length=2)
    ids, truncated = tight.build("rules", history, "now")
    assert truncated and len(ids) <= short + 5
    tiny = PromptBuilder(tokenizer, sequence_length=12 + 4, max_new_tokens=12, history_length=2)
    with pytest.raises(ValueError, match="sequence_length"):
        tiny.build("rules", history, "now")


def test_the_observation_loses_its_oldest_lines_never_the_instructions(sampler):
    tokenizer = sampler.tokenizer
    rules = "Rules: move the box to the goal and never stop early."
    observation = "\n".join(f"line {k}: a b c d e f g" for k in range(12))
    full = PromptBuilder(tokenizer, sequence_length=4096, max_new_tokens=8, history_length=2)
    needed = full.prompt_tokens(rules, observation)
    tight = PromptBuilder(tokenizer, sequence_length=needed - 20 + 8, max_new_tokens=8, history_length=2)
    ids, truncated = tight.build(rules, [("old state", "<answer>Up</answer>")], observation)
    text = tokenizer.decode(ids)
    assert truncated and len(ids) <= needed - 20
    assert rules in text and "line 11" in text and "line 0:" not in text and "old state" not in text
    # Even the last line alone too long: its start goes, the instructions stay.
    squeezed = PromptBuilder(tokenizer, sequence_length=full.prompt_tokens(rules, "") + 3 + 8, max_new_tokens=8,
                             history_length=0)
    text = tokenizer.decode(squeezed.build(rules, [], observation)[0])
    assert rules in text and "line 11" not in text and text.rstrip().endswith("assistant")


def test_truncations_are_counted(sampler):
    # Room for the instructions and the map, not for two turns of history.
    out = collector(sampler, sequence_length=230).collect(groups(1), group_size=2, sample_seed=4)
    assert out["prompt_truncated"][out["step_ids"] > 0].all()


def test_learner_logprobs_equal_sampling_logprobs_before_an_update(sampler):
    """The PPO ratio is exactly 1 on fresh samples: module log-probs on the padded learner batch equal the
    sampler's, with the action constraint and temperature applied on both sides."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from gigpo_rllib.env_runner import PLACEHOLDER_SPACES
    from gigpo_rllib.rl_module import LLMRLModule

    out = collector(sampler, constraint=True).collect(groups(2), group_size=2, sample_seed=5)
    batch = pad_token_batch(out, sampler.tokenizer.pad_token_id, out["allowed_replies"])
    module = RLModuleSpec(module_class=LLMRLModule, observation_space=PLACEHOLDER_SPACES[0],
                          action_space=PLACEHOLDER_SPACES[1], model_config={"model": "gigpo-tiny"}).build()
    module.set_state({"model." + k: v for k, v in sampler.model.state_dict().items()})
    with torch.no_grad():
        fwd = module.forward_train({k: torch.from_numpy(v) for k, v in batch.items()})
    mask = torch.from_numpy(batch["response_mask"])
    ratio = torch.exp(fwd[TOKEN_LOGPROBS] - torch.from_numpy(batch["old_logprobs"]))[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_padded_batch_layout(sampler):
    out = collector(sampler).collect(groups(1), group_size=2, sample_seed=6)
    batch = pad_token_batch(out, pad_token_id=0)
    for row, (prompt, response) in enumerate(zip(out["prompt_ids"], out["response_ids"])):
        end = len(prompt) + len(response)
        assert batch["input_ids"][row, :end].tolist() == prompt.tolist() + response.tolist()
        assert batch["attention_mask"][row].sum() == end
        assert batch["response_mask"][row].nonzero()[0].tolist() == list(range(len(prompt), end))
    assert batch["rewards"].dtype == np.float32 and batch["anchor_ids"].dtype == np.int64
    merged = merge_rollouts([out, out])
    assert len(merged["rewards"]) == 2 * len(out["rewards"])


def test_sharding_by_group_keeps_group_advantages_exact():
    rng = np.random.default_rng(0)
    n = 200
    batch = {"group_ids": rng.integers(0, 9, n), "traj_ids": None, "rewards": rng.normal(size=n)}
    batch["traj_ids"] = batch["group_ids"] * 10 + rng.integers(0, 3, n)
    batch["step_ids"] = np.arange(n)
    batch["anchor_ids"] = rng.integers(0, 4, n)
    shards = shard_rows(batch, 2)
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert not set(batch["group_ids"][shards[0]]) & set(batch["group_ids"][shards[1]])
    assert abs(len(shards[0]) - len(shards[1])) < 0.3 * n

    def advantages(part):
        tensors = [torch.as_tensor(part[k]) for k in ("rewards", "traj_ids", "step_ids", "group_ids", "anchor_ids")]
        return compute_gigpo_advantages(*tensors, method="mean_std").advantages

    whole = advantages(batch)
    for rows in shards:
        torch.testing.assert_close(advantages(take_rows(batch, rows)), whole[torch.as_tensor(rows)])
    with pytest.raises(ValueError, match="cannot shard 9 distinct group_ids over 10 learners"):
        shard_rows(batch, 10)


class EndlessEnv(gym.Env):
    """Never ends by itself: only a turn budget can stop it."""

    action_words = ("Up",)
    instructions = "Say Up."
    observation_space = gym.spaces.Text(8)
    action_space = gym.spaces.Discrete(1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "loop", {}

    def step(self, action):
        return "loop", 0.0, False, False, {}


gym.register("EndlessWithLimit-v0", entry_point=EndlessEnv, max_episode_steps=3)
gym.register("EndlessWithoutLimit-v0", entry_point=EndlessEnv)


def test_registered_turn_limit_is_enforced(sampler):
    env = envs.make_llm_env("EndlessWithLimit-v0")
    env.reset(seed=0)
    assert [env.step("<answer>Up</answer>")[3] for _ in range(3)] == [False, False, True]
    out = collector(sampler, constraint=False, max_new_tokens=4, sequence_length=256, history_length=0, max_envs=4,
                    make_env=envs.make_llm_env).collect(groups(1, tag="EndlessWithLimit-v0"), group_size=2,
                                                        sample_seed=0)
    assert out["episodes"]["length"].tolist() == [3, 3]


def test_env_without_a_turn_limit_is_refused(sampler):
    endless = collector(sampler, constraint=False, max_new_tokens=4, sequence_length=256, history_length=0,
                        max_envs=4, make_env=envs.make_llm_env)
    with pytest.raises(ValueError, match="has no turn limit"):
        endless.collect(groups(1, tag="EndlessWithoutLimit-v0"), group_size=1, sample_seed=0)


def test_constraint_needs_room_for_the_longest_reply(sampler):
    short = collector(sampler, max_new_tokens=3, sequence_length=512, history_length=0, max_envs=4,
                      make_env=envs.make_llm_env)
    with pytest.raises(ValueError, match=r"max_new_tokens \(3\) is shorter than the longest allowed reply"):
        short.collect(groups(1), group_size=1, sample_seed=0)


class ScriptedSampler:
    """Replies from a script, turn by turn; remembers the prompts it was given."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.prompts = tokenizer, replies, []

    def generate(self, prompt_ids, params, allowed_responses=None, seed=None):
        from gigpo_rllib.sampling.base import Completion

        reply = self.replies[len(self.prompts)]
        self.prompts.append([self.tokenizer.decode(p) for p in prompt_ids])
        ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return [Completion(ids, [0.0] * len(ids), "stop") for _ in prompt_ids]


def test_history_records_every_turn_valid_or_not(sampler):
    replies = ["<answer>Up</answer>", "no idea", "<answer>Left</answer>", "<answer>Down</answer>"]
    scripted = ScriptedSampler(sampler.tokenizer, replies)
    # Sokoban: no move in these replies can end the episode before the fourth turn.
    out = collector(scripted, constraint=False, max_envs=1).collect(groups(1, tag="Sokoban"), group_size=1,
                                                                   sample_seed=0)
    assert out["action_is_valid"].tolist()[:3] == [True, False, True]
    third_prompt = scripted.prompts[2][0]
    assert "<answer>Up</answer>" in third_prompt and "no idea" in third_prompt  # the invalid turn is there too
    fourth_prompt = scripted.prompts[3][0]
    assert "no idea" in fourth_prompt and "<answer>Left</answer>" in fourth_prompt
    assert "<answer>Up</answer>" not in fourth_prompt.split("<|im_start|>system")[1].split("<|im_end|>", 1)[1]


class NoisyRoomEnv(gym.Env):
    """A one-room env whose observation carries a random reading that changes nothing: exact anchors split the
    same state apart, similarity grouping joins it again."""

    action_words = ("Up",)
    instructions = "Say Up."
    observation_space = gym.spaces.Text(64)
    action_space = gym.spaces.Discrete(1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._observation(), {}

    def _observation(self):
        return f"You are in the hall. Thermometer: {self.np_random.integers(10, 99)}"

    def step(self, action):
        return self._observation(), 0.0, False, False, {}


gym.register("NoisyRoom-v0", entry_point=NoisyRoomEnv, max_episode_steps=3)


@pytest.mark.parametrize("threshold, anchors_per_group", [(None, 3), (0.8, 1)])
def test_similarity_grouping_joins_near_duplicate_states(sampler, threshold, anchors_per_group):
    # Each group's members replay the same three readings (same seed); only similarity grouping sees one hall.
    out = collector(sampler, sequence_length=256, history_length=0, max_envs=8, anchor_similarity=threshold,
                    make_env=lambda tag: envs.make_llm_env(tag, include_canonical_text=threshold is not None)
                    ).collect(groups(2, tag="NoisyRoom-v0"), group_size=4, sample_seed=0)
    for group in (0, 1):
        assert len(set(out["anchor_ids"][out["group_ids"] == group].tolist())) == anchors_per_group
    if threshold is not None:  # never across episode groups
        assert out["anchor_ids"][out["group_ids"] == 0][0] != out["anchor_ids"][out["group_ids"] == 1][0]


def shout(tag: str) -> str:
    return f"Play {tag} loudly."


def test_system_prompt_is_text_or_a_function_of_the_tag():
    from gigpo_rllib.env_runner import system_prompt_for

    assert system_prompt_for(None)("FrozenLake") is None
    assert system_prompt_for("Rules: be brief.")("FrozenLake") == "Rules: be brief."  # a colon alone is text
    assert system_prompt_for("tests.test_rollout:shout")("Sokoban") == "Play Sokoban loudly."
    with pytest.raises(ValueError, match="cannot import"):
        system_prompt_for("tests.test_rollout:no_such_function")


# --------------------------------------------------------------------------------------------- faulty envs


def faulty(sampler, step_timeout_s=None, env_error_penalty=None, **faults):
    import tests.learning_env  # noqa: F401  (registers FaultyCorridor-v0)

    settings = RolloutSettings(sampling=SamplingParams(max_new_tokens=12), sequence_length=512, history_length=1,
                               max_envs=64, action_constraint=True, step_timeout_s=step_timeout_s,
                               env_error_penalty=env_error_penalty)
    return StepCollector(sampler, lambda tag: envs.make_llm_env("FaultyCorridor-v0", **faults), settings)


def assert_only_whole_trajectories(out, group_size):
    for traj in set(out["traj_ids"].tolist()):
        steps = out["step_ids"][out["traj_ids"] == traj]
        assert steps.tolist() == list(range(len(steps)))  # nothing missing in the middle
        assert out["episode_ends"][out["traj_ids"] == traj].sum() == 1  # and it ended
    for group in set(out["group_ids"].tolist()):
        assert len(set(out["traj_ids"][out["group_ids"] == group].tolist())) >= 2  # a baseline for every group


def test_env_errors_lose_only_their_trajectories(sampler):
    out = faulty(sampler, raise_rate=0.2).collect(groups(8), group_size=4, sample_seed=0)
    lost = out["lost"]
    assert lost["env_error"] > 0 and lost["step_timeout"] == lost["non_finite_reward"] == 0
    kept = len(set(out["traj_ids"].tolist()))
    assert kept > 0 and kept + lost["env_error"] + lost["group_dropped"] == 32
    assert_only_whole_trajectories(out, 4)
    assert np.isfinite(out["rewards"]).all() and "deliberate step failure" in out["first_fault"]
    # Episodes that finished count in the episode metrics, dropped groups' included.
    assert len(out["episodes"]["return"]) == 32 - lost["env_error"]


def test_with_env_error_penalty_a_valid_action_the_env_raises_on_ends_and_keeps_its_trajectory(sampler):
    out = faulty(sampler, env_error_penalty=-1.0, raise_rate=0.2).collect(groups(8), group_size=4, sample_seed=0)
    assert out["lost"]["env_error"] == 0 and out["ended_by_env_error"] > 0
    penalized = out["rewards"] == -1.0  # the corridor's own rewards are 0 and 1
    assert penalized.sum() == out["ended_by_env_error"]
    assert out["episode_ends"][penalized].all() and out["action_is_valid"][penalized].all()
    assert not out["episode_success"][penalized].any()
    # Every trajectory is in the batch, with all its turns: the penalized ones train and join their group's baseline.
    assert len(set(out["traj_ids"].tolist())) == 32 and out["groups_dropped"] == 0
    assert_only_whole_trajectories(out, 4)
    assert len(out["episodes"]["return"]) == 32 and (out["episodes"]["return"] < 0).sum() == out["ended_by_env_error"]
    # Faults that are not the env rejecting a valid action are still lost.
    out = faulty(sampler, env_error_penalty=-1.0, reset_raise_rate=0.2).collect(groups(8), group_size=4, sample_seed=0)
    assert out["lost"]["env_error"] > 0 and out["ended_by_env_error"] == 0


def test_reset_errors_and_non_finite_rewards_are_counted_by_cause(sampler):
    out = faulty(sampler, nan_rate=0.3, reset_raise_rate=0.2).collect(groups(8), group_size=4, sample_seed=1)
    assert out["lost"]["env_error"] > 0 and out["lost"]["non_finite_reward"] > 0
    assert np.isfinite(out["rewards"]).all()
    assert_only_whole_trajectories(out, 4)


def test_a_hanging_step_times_out_and_its_env_is_replaced(sampler):
    import time

    from tests.learning_env import FaultyCorridorEnv

    FaultyCorridorEnv._hung_in_this_process = False
    started = time.perf_counter()
    collector = faulty(sampler, step_timeout_s=0.5, hang_once_s=30)
    out = collector.collect(groups(2), group_size=3, sample_seed=2)
    assert time.perf_counter() - started < 20
    assert out["lost"]["step_timeout"] == 1 and len(set(out["traj_ids"].tolist())) == 5
    # The hung env never comes back: the next batch gets fresh envs and loses nothing.
    assert sum(collector.collect(groups(2), group_size=3, sample_seed=3)["lost"].values()) == 0


def test_env_worker_answers_raises_and_times_out_on_one_thread():
    import threading
    import time

    from gigpo_rllib.rollout import EnvWorker

    worker = EnvWorker()
    assert worker.call(lambda: 4, 1.0) == 4
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0, 1.0)
    threads = {worker.call(threading.get_ident, 1.0) for _ in range(3)}
    assert len(threads) == 1 and threading.get_ident() not in threads
    with pytest.raises(TimeoutError):
        worker.call(lambda: time.sleep(5), 0.1)
    worker.stop()


class ThreadRecordingEnv(gym.Wrapper):
    """Records the thread of every reset and step."""

    calls: list[tuple[int, int]] = []  # (id of the env, thread id)

    def reset(self, **kwargs):
        import threading

        ThreadRecordingEnv.calls.append((id(self), threading.get_ident()))
        return super().reset(**kwargs)

    def step(self, action):
        import threading

        ThreadRecordingEnv.calls.append((id(self), threading.get_ident()))
        return super().step(action)


def test_each_env_makes_all_its_calls_on_one_worker_thread(sampler, monkeypatch):
    import threading

    started = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread), start(thread))[1])
    ThreadRecordingEnv.calls = []
    settings = RolloutSettings(sampling=SamplingParams(max_new_tokens=12), sequence_length=1024, history_length=1,
                               max_envs=16, action_constraint=True, step_timeout_s=30.0)
    collector_ = StepCollector(sampler, lambda tag: ThreadRecordingEnv(envs.make_llm_env(tag, max_steps=4)), settings)
    for sample_seed in range(2):  # the second batch reuses the first one's envs, and their threads
        collector_.collect(groups(2), group_size=2, sample_seed=sample_seed)
    threads_of = defaultdict(set)
    for env, thread in ThreadRecordingEnv.calls:
        threads_of[env].add(thread)
    assert len(ThreadRecordingEnv.calls) > 2 * len(threads_of)  # several calls per env
    assert all(len(threads) == 1 for threads in threads_of.values())
    assert threading.get_ident() not in set().union(*threads_of.values())
    assert len(started) == len(threads_of) == 4


def test_prompts_built_in_one_batch_equal_those_built_one_by_one(sampler):
    builder = PromptBuilder(sampler.tokenizer, sequence_length=160, max_new_tokens=12, history_length=2)
    history = [(f"state {k}", "<answer>Up</answer>") for k in range(3)]
    requests = [("rules", [], "now"), ("rules", history, "now"),
                ("rules", [("a long state " * 12, "<answer>Up</answer>")] * 3, "now"), ("other rules", history[:1], "x " * 200)]
    built = builder.build_many(requests)
    assert built == [builder.build(*request) for request in requests]
    assert [truncated for _, truncated in built] == [False, False, True, True]


def test_envs_of_a_failed_wave_are_closed(sampler):
    closed = []

    class ClosingEnv(gym.Wrapper):
        def close(self):
            closed.append(self)
            super().close()

    class BrokenSampler:
        tokenizer = sampler.tokenizer
        calls = 0

        def generate(self, *args, **kwargs):
            BrokenSampler.calls += 1
            if BrokenSampler.calls > 1:
                raise RuntimeError("the sampler broke mid-wave")
            return sampler.generate(*args, **kwargs)

    collector_ = collector(BrokenSampler(), make_env=lambda tag: ClosingEnv(envs.make_llm_env(tag, max_steps=4)))
    with pytest.raises(RuntimeError, match="mid-wave"):
        collector_.collect(groups(2), group_size=2, sample_seed=0)
    # Envs that finished in the first turn went back to the pool; the others, left mid-episode, were closed.
    assert len(closed) + sum(len(idle) for idle in collector_._idle_envs.values()) == 4 and closed


def test_constrained_prompts_leave_out_the_answer_format_line(sampler):
    for constraint in (True, False):
        out = collector(sampler, constraint=constraint).collect(groups(1), group_size=2, sample_seed=5)
        prompt = sampler.tokenizer.decode(out["prompt_ids"][0])
        assert "FrozenLake" in prompt
        assert ("Give exactly one action inside" in prompt) is not constraint


class RecordingSampler:
    """Answers every prompt with the first allowed reply and remembers the sampling settings of each call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.params = tokenizer, []

    def generate(self, prompt_ids, params, allowed_responses=None, seed=None):
        from gigpo_rllib.sampling.base import Completion

        self.params.append(params)
        reply = self.tokenizer("<answer>Up</answer>", add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return [Completion(reply, [0.0] * len(reply), "stop") for _ in prompt_ids]


@pytest.mark.parametrize("greedy, temperature, expected", [(False, None, (False, 1.0)), (False, 0.3, (False, 0.3)),
                                                            (True, 0.3, (True, 1.0))])
def test_evaluation_decoding_overrides_only_its_own_calls(sampler, greedy, temperature, expected):
    recording = RecordingSampler(sampler.tokenizer)
    collect = collector(recording, constraint=False, max_envs=2).collect
    collect(groups(1, tag="Sokoban"), group_size=1, sample_seed=0, greedy=greedy, temperature=temperature)
    collect(groups(1, tag="Sokoban"), group_size=1, sample_seed=0)  # training: the settings' own sampling
    assert {(params.greedy, params.temperature) for params in recording.params[:1]} == {expected}
    assert (recording.params[-1].greedy, recording.params[-1].temperature) == (False, 1.0)
