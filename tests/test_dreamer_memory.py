"""The Dreamer agent's recurrent actor (``dreamer.actor_memory=gru``): its cached step equals its
sequence pass, it carries its memory through imagination and through the policy interface, and a
tiny egocentric run goes end to end with it."""

import numpy as np
import pytest
import torch

from agents.dreamer import DreamerAgent, DreamerConfig, DreamerPolicy, RecurrentActor, Trajectory, imagine
from agents.policy import PolicyInput, load_policy, save_policy
from agents.train_dreamer import StartFrames, imagination_update, optimizer_for

torch.set_num_threads(1)
SMALL = dict(actor_memory="gru", hidden_dim=16, channels=4, embed_dim=4, memory_dim=8)


def _actor(seed=0, vocab_size=5, grid=(3, 4)):
    torch.manual_seed(seed)
    return DreamerAgent(DreamerConfig(**SMALL), vocab_size, grid).actor


def test_recurrent_actor_cached_step_equals_its_sequence_pass():
    actor = _actor()
    assert isinstance(actor, RecurrentActor)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 5, (6, 3, 3, 4), generator=generator)  # (T, B, h, w)
    previous = torch.randint(-1, 7, (6, 3), generator=generator)
    start = torch.randn(3, 8, generator=generator)
    sequence_logits, sequence_states = actor.sequence(tokens, previous, start)
    state, stepped = start, []
    for t in range(6):
        logits, state = actor.step(tokens[t], previous[t], state)
        stepped.append(logits)
    assert torch.allclose(torch.stack(stepped), sequence_logits, atol=1e-6)
    assert torch.allclose(state, sequence_states[-1], atol=1e-6)
    # The memory is read: another past gives other logits on the same last frame.
    other = actor.sequence(torch.cat([tokens[:5].flip(1), tokens[5:]]), previous, start)[0]
    assert not torch.allclose(other[-1], sequence_logits[-1], atol=1e-4)


def test_burn_in_skips_the_frames_before_the_episode():
    class Dataset:  # two episodes: frames 0-3 (3 steps) and 4-6 (2 steps)
        num_frames = 7
        episode_starts = np.array([0, 4])
        episode_lengths = np.array([3, 2])
        actions = np.array([2, 0, 1, -1, 5, 3, -1])

    tokens = np.arange(7)[:, None, None].repeat(3, 1).repeat(4, 2) % 5
    starts = StartFrames.from_dataset(Dataset(), tokens, context_length=1)
    history_tokens, history_actions, valid, start_actions = starts.history(np.array([2, 5, 4]), 3)
    assert valid.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert history_tokens[0, 1:, 0, 0].tolist() == [0, 1] and history_tokens[1, 2, 0, 0].tolist() == 4
    assert history_actions[0, 1:].tolist() == [-1, 2] and history_actions[1, 2].item() == -1  # first frames: no action
    assert start_actions.tolist() == [0, 5, -1]
    actor = _actor()
    state = actor.burn_in(history_tokens, history_actions, valid)
    assert torch.equal(state[2], torch.zeros(8))  # nothing before an episode's first frame
    alone = actor.burn_in(history_tokens[:1, 1:], history_actions[:1, 1:], valid[:1, 1:])
    assert torch.allclose(state[0], alone[0], atol=1e-6)  # the skipped frame changed nothing


class _CueModel:
    """A two-step task that needs memory: the first frame shows a cue (token 1 or 2), the second
    is blank, and only the action matching the cue there (0 for cue 1, 1 for cue 2) pays 1."""

    vocab_size = 3

    def reset(self, context_tokens, context_actions):
        self.cue = torch.as_tensor(context_tokens)[:, -1, 0, 0].clone()
        self.t = 0
        return torch.as_tensor(context_tokens)[:, -1]

    def step(self, actions):
        from agents.toy import ToyStep

        b = len(actions)
        self.t += 1
        right = (torch.as_tensor(actions) == self.cue - 1) & (self.t == 2)
        done = torch.full((b,), self.t >= 2)
        return ToyStep(torch.zeros(b, 1, 1, dtype=torch.long), right.float(), done, torch.zeros(b, 1, dtype=torch.long))


@pytest.mark.parametrize("memory", ["none", "gru"])
def test_only_the_recurrent_actor_learns_a_task_that_needs_memory(memory):
    torch.manual_seed(0)
    model = _CueModel()
    cfg = DreamerConfig(horizon=2, batch_size=64, hidden_dim=16, channels=4, embed_dim=4, memory_dim=16,
                        actor_memory=memory, actor_lr=3e-3, critic_lr=3e-3, entropy_coef=3e-2, entropy_coef_final=3e-2)
    agent = DreamerAgent(cfg, model.vocab_size, (1, 1))
    optimizer = optimizer_for(agent, cfg)
    generator = torch.Generator().manual_seed(0)
    cues = (torch.arange(64) % 2 + 1)[:, None, None, None]  # half each: no action is right more often than not
    no_actions = torch.zeros(64, 0, dtype=torch.long)
    for _ in range(400):  # seeds 0-2: success 1.0 with the memory (0.53 without)
        losses = imagination_update(agent, optimizer, model, (cues, no_actions), generator)
    trajectory = imagine(model, agent.actor, cues, no_actions, 2, torch.Generator().manual_seed(1))
    success = float(trajectory.rewards.sum(0).mean())
    if memory == "gru":
        assert success > 0.9, losses.parts  # it recalls the cue
    else:
        assert success < 0.7, losses.parts  # a blank frame alone cannot tell: at best a coin flip


def test_recurrent_policy_carries_its_memory_and_forgets_it_on_reset(tmp_path):
    actor = _actor()
    cfg = DreamerConfig(**SMALL)
    policy = DreamerPolicy(actor, cfg, (3, 4), mode="greedy")
    loaded = load_policy(save_policy(tmp_path / "agent.pt", policy))
    assert isinstance(loaded, DreamerPolicy) and isinstance(loaded.actor, RecurrentActor)
    frames = np.random.default_rng(0).integers(0, 5, size=(5, 2, 3, 4))
    for candidate in (policy, loaded):
        candidate.reset(2, seed=0)
    taken = []
    for frame in frames:
        actions = loaded.act(PolicyInput(tokens=frame))
        assert np.array_equal(actions, policy.act(PolicyInput(tokens=frame)))
        taken.append(actions)
    # The episode's steps, replayed as one sequence from the initial state with the policy's own actions.
    previous = torch.as_tensor(np.stack([np.full(2, -1)] + taken[:-1]))
    logits = actor.sequence(torch.as_tensor(frames), previous, actor.initial_state(2))[0]
    assert np.array_equal(logits.argmax(-1).numpy(), np.stack(taken))
    loaded.reset(2, seed=0)
    assert np.array_equal(loaded.act(PolicyInput(tokens=frames[0])), taken[0])  # a new episode remembers nothing


def test_recurrent_actor_refuses_behaviour_cloning():
    with pytest.raises(ValueError, match="actor_memory=none"):
        DreamerAgent(DreamerConfig(**SMALL, bc_steps=10), 5, (3, 4))


def test_the_loss_reads_the_start_memory():
    actor_cfg = DreamerConfig(**SMALL)
    agent = DreamerAgent(actor_cfg, 5, (3, 4))
    tokens = torch.randint(0, 5, (4, 2, 3, 4), generator=torch.Generator().manual_seed(0))
    trajectory = Trajectory(tokens, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.ones(3, 2))
    fresh = agent.actor_logits(trajectory)
    from agents.dreamer import ActorMemory

    trajectory.memory = ActorMemory(torch.randn(2, 8), torch.tensor([3, -1]))
    assert fresh.shape == (3, 2, 7) and not torch.allclose(agent.actor_logits(trajectory), fresh)


def test_tiny_egocentric_run_with_the_recurrent_actor_goes_end_to_end(tmp_path):
    """The quickstart on the tiny preset, egocentric view, recurrent actor: every stage runs, the
    saved policy is recurrent and the evaluation scored it (in the real env and in imagination)."""
    from scripts import quickstart

    result = quickstart.main([
        "--preset", "tiny", f"run.root={tmp_path}", "run.name=ego", "env.obs=partial", "dreamer.actor_memory=gru",
        "tokenizer.steps=50", "tokenizer.checkpoint_every=50", "dynamics.steps=20", "dynamics.checkpoint_every=10",
        "dreamer.updates=10", "dreamer.checkpoint_every=5", "evaluate.policies=dreamer,random,oracle",
        "evaluate.bootstrap=100", "evaluate.gif_policies=dreamer", "run.threads=1",
    ])
    policy = load_policy(tmp_path / "ego" / "dreamer.pt")
    assert isinstance(policy.actor, RecurrentActor) and policy.actor.memory_dim == DreamerConfig().memory_dim
    evaluated = result["evaluate"]
    assert evaluated["num_policies"] == 3 and evaluated["normalized_score"] is not None
    assert evaluated["imagined_return"] is not None


def test_auto_memory_follows_the_view():
    from omegaconf import OmegaConf

    from agents.train_dreamer import stage_config

    for obs, expected in (("partial", "gru"), ("full", "none")):
        cfg = OmegaConf.create({"env": {"obs": obs}, "dreamer": {"actor_memory": "auto"}})
        assert stage_config(cfg).actor_memory == expected
    with pytest.raises(ValueError, match="resolve_actor_memory"):
        DreamerAgent(DreamerConfig(actor_memory="auto"), 5, (3, 4))
