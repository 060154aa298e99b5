"""VAGEN-style agent: advantages, rewards, parsing, and a tiny end-to-end training run."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.rl import gae
from agents.vagen import (
    FIELDS,
    Vocab,
    bilevel_gae,
    parse_response,
    state_fields,
    template,
    turn_level_advantages,
    world_model_reward,
)
from envs.make import make_env
from envs.state import StateCodec

WEIGHTS = {"agent_pos": 2.0, "agent_dir": 1.0, "carrying": 1.0, "key_pos": 1.0, "door_pos": 1.0, "door": 1.0, "goal_pos": 2.0}


# --- advantages --------------------------------------------------------------------------------


def test_bilevel_gae_matches_hand_computed_case():
    # Two turns: turn 0 has 3 tokens, turn 1 has 2 (the third is padding); the episode ends at turn 1.
    values = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]]])
    mask = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    rewards = torch.tensor([[0.5, 1.0]])
    dones = torch.tensor([[False, True]])
    adv, ret, turn_adv = bilevel_gae(
        rewards, dones, values, mask, torch.tensor([9.0]),  # bootstrap ignored: episode over
        turn_gamma=0.9, turn_lambda=0.8, token_gamma=0.95, token_lambda=0.7,
    )
    # Turn values are the last-token values 0.3 and 0.5.
    a1 = 1.0 - 0.5  # 0.5
    a0 = (0.5 + 0.9 * 0.5 - 0.3) + 0.9 * 0.8 * a1  # 1.01
    assert turn_adv[0].tolist() == pytest.approx([a0, a1])
    t01 = 0.95 * 0.3 - 0.2 + 0.95 * 0.7 * a0
    t00 = 0.95 * 0.2 - 0.1 + 0.95 * 0.7 * t01
    t10 = 0.95 * 0.5 - 0.4 + 0.95 * 0.7 * a1
    expected = [[t00, t01, a0], [t10, a1, 0.0]]
    assert adv[0].tolist() == [pytest.approx(row) for row in expected]
    expected_returns = (torch.tensor(expected) + values[0]) * mask[0]
    assert torch.allclose(ret[0], expected_returns)


def test_bilevel_gae_bootstraps_a_cut_rollout():
    values = torch.tensor([[[0.0, 0.2]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    adv, _, turn_adv = bilevel_gae(
        torch.tensor([[0.0]]), torch.tensor([[False]]), values, mask, torch.tensor([1.0]),
        turn_gamma=0.5, turn_lambda=1.0, token_gamma=1.0, token_lambda=1.0,
    )
    assert turn_adv.item() == pytest.approx(0.5 * 1.0 - 0.2)
    assert adv[0, 0].tolist() == pytest.approx([0.2 - 0.0 + 0.3, 0.3])


def test_bilevel_gae_with_one_token_per_turn_is_ordinary_gae():
    g = torch.Generator().manual_seed(0)
    N, T = 3, 7
    rewards = torch.randn(N, T, generator=g)
    values = torch.randn(N, T, generator=g)
    dones = torch.rand(N, T, generator=g) < 0.3
    last_value = torch.randn(N, generator=g)
    # Padding positions hold garbage values that must not leak in.
    padded = torch.cat([values.unsqueeze(-1), torch.randn(N, T, 2, generator=g)], dim=-1)
    mask = torch.zeros(N, T, 3, dtype=torch.bool)
    mask[..., 0] = True
    adv, ret, _ = bilevel_gae(
        rewards, dones, padded, mask, last_value, turn_gamma=0.97, turn_lambda=0.9, token_gamma=0.9, token_lambda=0.5
    )
    ref_adv, ref_ret = gae(rewards, dones, values, last_value, 0.97, 0.9)
    # Reference: the textbook recursion written out separately.
    manual = torch.zeros(N, T)
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            nv = last_value[n] if t == T - 1 else values[n, t + 1]
            alive = 0.0 if dones[n, t] else 1.0
            running = rewards[n, t] + 0.97 * nv * alive - values[n, t] + 0.97 * 0.9 * alive * running
            manual[n, t] = running
    assert torch.allclose(ref_adv, manual, atol=1e-6)
    assert torch.allclose(adv[..., 0], manual, atol=1e-6)
    assert torch.allclose(ret[..., 0], ref_ret, atol=1e-6)
    assert torch.all(adv[..., 1:] == 0) and torch.all(ret[..., 1:] == 0)


def test_turn_level_advantages_spread_the_turn_advantage_over_the_turn():
    values = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]]])
    mask = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    adv, ret, turn_adv = turn_level_advantages(
        torch.tensor([[0.5, 1.0]]), torch.tensor([[False, True]]), values, mask, torch.tensor([0.0]),
        turn_gamma=0.9, turn_lambda=0.8,
    )
    assert turn_adv[0].tolist() == pytest.approx([1.01, 0.5])
    assert adv[0].tolist() == [pytest.approx([1.01] * 3), pytest.approx([0.5, 0.5, 0.0])]
    assert ret[0].tolist() == [pytest.approx([1.31] * 3), pytest.approx([1.0, 1.0, 0.0])]


def test_world_model_credit_gives_each_field_token_its_own_share():
    """The world-modeling stream, each turn on its own: a well-formed response's thinking token has
    its own slot's reward as its return (A_i = r_i - V_i), its action none; a malformed response
    (here the second and third: an action too early) credits every token, the action included,
    with the turn's reward, the format penalty."""
    from agents.vagen import world_model_advantages

    first_action = 10
    tokens = torch.tensor([[[1, 2, 3, 10], [11, 0, 0, 0], [4, 12, 0, 0]]])  # (N=1, T=3, L=4)
    mask = torch.tensor([[[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]], dtype=torch.bool)
    values = torch.tensor([[[0.1, 0.2, 0.3, 9.0], [5.0, 0.0, 0.0, 0.0], [0.4, 7.0, 0.0, 0.0]]])
    slot_rewards = torch.tensor([[[0.5, 0.0, 0.25, 0.0], [0.0] * 4, [0.5, 0.0, 0.0, 0.0]]])
    rewards = torch.tensor([[0.75, 0.0, 0.5]])
    well_formed = torch.tensor([[True, True, True]])
    adv, ret, credited = world_model_advantages(rewards, slot_rewards, values, mask, tokens, well_formed, first_action)
    assert credited[0].tolist() == [[True, True, True, False], [False] * 4, [True, False, False, False]]
    assert ret[0, 0].tolist() == pytest.approx([0.5, 0.0, 0.25, 0.0]) and adv[0, 0].tolist() == pytest.approx([0.4, -0.2, -0.05, 0.0])
    assert adv[0, 1].tolist() == [0.0] * 4 and adv[0, 2].tolist() == pytest.approx([0.1, 0.0, 0.0, 0.0])
    malformed = torch.tensor([[True, False, False]])
    penalties = torch.tensor([[0.75, -0.1, -0.1]])
    adv, ret, credited = world_model_advantages(penalties, slot_rewards, values, mask, tokens, malformed, first_action)
    assert credited[0].tolist() == [[True, True, True, False], [True, False, False, False], [True, True, False, False]]
    assert adv[0, 1, 0].item() == pytest.approx(-5.1) and adv[0, 2, :2].tolist() == pytest.approx([-0.5, -7.1])
    assert ret[0, 2, :2].tolist() == pytest.approx([-0.1, -0.1])



def test_value_loss_of_two_streams_uses_each_streams_tokens():
    from agents.rl import ppo_loss

    zeros = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    values, returns = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 2.0], [1.0, 2.0], [1.0, 100.0]]])
    value_mask = torch.tensor([[[1, 1], [1, 1], [1, 0]]], dtype=torch.bool)  # the last token has no second-stream target
    losses = ppo_loss(zeros, zeros, zeros, values, returns, zeros, mask, clip=0.2, value_coef=1.0, entropy_coef=0.0, value_mask=value_mask)
    assert losses.parts["value"] == pytest.approx(0.5 * (3 * 1.0 + 2 * 4.0) / 3)


def test_huber_value_loss_is_squared_within_delta_and_linear_beyond():
    """A surprising return (error 10) pulls the critic with the gradient of an error of delta,
    where the squared error would pull 10 times harder; small errors are scored as before."""
    from agents.rl import ppo_loss

    zeros = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    returns = torch.tensor([[0.5, 10.0]])
    kwargs = dict(clip=0.2, value_coef=1.0, entropy_coef=0.0)
    values = torch.zeros(1, 2, requires_grad=True)
    huber = ppo_loss(zeros, zeros, zeros, values, returns, zeros, mask, huber_delta=1.0, **kwargs)
    huber.total.backward()
    assert huber.parts["value"] == pytest.approx((0.5 * 0.25 + (10.0 - 0.5)) / 2)
    assert torch.allclose(values.grad, torch.tensor([[-0.25, -0.5]]))  # (-0.5, -1) / 2 tokens
    squared = ppo_loss(zeros, zeros, zeros, torch.zeros(1, 2), returns, zeros, mask, **kwargs)
    assert squared.parts["value"] == pytest.approx((0.5 * 0.25 + 0.5 * 100.0) / 2)



def test_whitening_floor_keeps_nearly_equal_advantages_small():
    from agents.rl import masked_whiten

    mask = torch.ones(1, 4, dtype=torch.bool)
    tiny = torch.tensor([[0.001, -0.001, 0.002, -0.002]])  # the critic's error, nothing to learn
    assert masked_whiten(tiny, mask).pow(2).mean().item() == pytest.approx(1.0, rel=1e-2)  # blown up to unit scale
    floored = masked_whiten(tiny, mask, std_floor=0.05)
    assert floored.tolist() == [pytest.approx([0.02, -0.02, 0.04, -0.04], rel=1e-4)]
    large = torch.tensor([[1.0, -1.0, 2.0, -2.0]])  # above the floor: ordinary whitening
    assert torch.allclose(masked_whiten(large, mask, std_floor=0.05), masked_whiten(large, mask))



def test_value_normaliser_std_has_a_floor():
    """Returns that are all the same (no success yet) leave the std at the floor, so a rare
    success lands floor-scaled stds away, not a thousand."""
    from agents.vagen import ValueNormalizer

    norm = ValueNormalizer(std_floor=0.1)
    for _ in range(50):
        norm.update(torch.zeros(64))
    assert norm.std == pytest.approx(0.1)
    assert float(norm.normalize(torch.tensor(0.9))) == pytest.approx(9.0)
    loose = ValueNormalizer()
    for _ in range(50):
        loose.update(torch.zeros(64))
    assert float(loose.normalize(torch.tensor(0.9))) > 500


# --- parsing and rewards -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def doorkey():
    env = make_env("MiniGrid-DoorKey-5x5-v0", seed=3)
    _, info = env.reset(seed=3)
    before = info["state"]
    _, _, _, _, info = env.step(1)  # turn right: only the direction changes
    after = info["state"]
    codec = StateCodec(5, 5)
    vocab = Vocab(5, 5)
    return vocab, state_fields(before, codec, vocab), state_fields(after, codec, vocab)


def response(vocab, state, prediction, action):
    return [state[f] for f in FIELDS] + [prediction[f] for f in FIELDS] + [int(vocab.action_ids[action])]


def test_state_fields_read_the_doorkey_state(doorkey):
    vocab, before, after = doorkey
    assert vocab.names[before["door"]] == "door_locked"
    assert vocab.names[before["door_pos"]].startswith("c") and before["door_pos"] not in (before["key_pos"], before["goal_pos"])
    assert vocab.names[before["carrying"]] == "none"
    assert vocab.names[before["key_pos"]].startswith("c") and vocab.names[before["goal_pos"]] == "c3,3"
    changed = [f for f in FIELDS if before[f] != after[f]]
    assert changed == ["agent_dir"]


def test_parse_well_formed_world_modeling_response(doorkey):
    vocab, before, after = doorkey
    parsed = parse_response(response(vocab, before, after, 1), "WorldModeling", vocab)
    assert parsed.well_formed and parsed.action == 1 and not parsed.error
    assert parsed.state == before and parsed.prediction == after


@pytest.mark.parametrize(
    "strategy, length", [("NoThink", 1), ("StateEstimation", 8), ("TransitionModeling", 8), ("WorldModeling", 15), ("FreeThink", 13)]
)
def test_templates_have_the_documented_length(strategy, length):
    assert len(template(strategy, free_think_len=12)) == length


def test_parse_malformed_responses(doorkey):
    vocab, before, after = doorkey
    good = response(vocab, before, after, 2)
    early_action = good[:3] + [int(vocab.action_ids[2])]
    wrong_type = list(good)
    wrong_type[1] = before["agent_pos"]  # a cell where a direction belongs
    no_action = good[:-1] + [before["agent_dir"]]
    bos_inside = list(good)
    bos_inside[4] = vocab.bos
    for tokens, needle in [(early_action, "early"), (wrong_type, "slot 1"), (no_action, "slot 14"), (bos_inside, "slot 4"), ([], "no action")]:
        parsed = parse_response(tokens, "WorldModeling", vocab)
        assert not parsed.well_formed, tokens
        assert parsed.action == vocab.noop_action == 6 and parsed.state is None and parsed.prediction is None
        assert needle in parsed.error
    assert not parse_response([before["agent_pos"]], "NoThink", vocab).well_formed
    assert parse_response([int(vocab.action_ids[5])], "NoThink", vocab).action == 5
    # FreeThink accepts any non-action token in its free slots, but not <bos> or an action.
    free = [before["agent_pos"], vocab.ids["north"]] * 6 + [int(vocab.action_ids[0])]
    assert parse_response(free, "FreeThink", vocab).well_formed
    assert not parse_response([vocab.bos] + free[1:], "FreeThink", vocab).well_formed


def reward_of(vocab, tokens, before, after, strategy="WorldModeling"):
    parsed = parse_response(tokens, strategy, vocab)
    return world_model_reward(
        parsed, strategy, before, after, state_weight=0.3, prediction_weight=0.5, field_weights=WEIGHTS, format_penalty=-0.2
    )


def test_perfect_response_gets_the_full_world_modeling_reward(doorkey):
    vocab, before, after = doorkey
    result = reward_of(vocab, response(vocab, before, after, 1), before, after)
    assert result.reward == pytest.approx(0.8)
    assert result.state_accuracy == 1.0 and result.prediction_accuracy == 1.0


def test_a_wrong_field_loses_its_weight(doorkey):
    vocab, before, after = doorkey
    wrong_pos = dict(before, agent_pos=vocab.cell(2, 2) if before["agent_pos"] != vocab.cell(2, 2) else vocab.cell(1, 1))
    result = reward_of(vocab, response(vocab, wrong_pos, after, 1), before, after)
    assert result.reward == pytest.approx(0.8 - 0.3 * 2.0 / 9.0)
    # Predicting "no change" gets the direction wrong: the prediction loses that field's weight.
    result = reward_of(vocab, response(vocab, before, before, 1), before, after)
    assert result.reward == pytest.approx(0.8 - 0.5 * 1.0 / 9.0)
    assert result.prediction_accuracy == pytest.approx(8.0 / 9.0)


def test_each_slot_earns_its_own_fields_share(doorkey):
    """The slot rewards (world_model_credit=field) split the turn's reward by field: they add up to
    it, a wrong field's slot earns 0 and no other slot loses anything; the action earns none."""
    vocab, before, after = doorkey
    perfect = reward_of(vocab, response(vocab, before, after, 1), before, after)
    shares = [0.3 * WEIGHTS[f] / 9.0 for f in FIELDS] + [0.5 * WEIGHTS[f] / 9.0 for f in FIELDS] + [0.0]
    assert list(perfect.slot_rewards) == pytest.approx(shares)
    assert sum(perfect.slot_rewards) == pytest.approx(perfect.reward)
    wrong_door = dict(after, door=vocab.ids["door_open"] if after["door"] != vocab.ids["door_open"] else vocab.ids["door_locked"])
    result = reward_of(vocab, response(vocab, before, wrong_door, 1), before, after)
    door_slot = len(FIELDS) + FIELDS.index("door")
    assert result.slot_rewards[door_slot] == 0.0
    assert [r for i, r in enumerate(result.slot_rewards) if i != door_slot] == pytest.approx([r for i, r in enumerate(shares) if i != door_slot])
    assert sum(result.slot_rewards) == pytest.approx(result.reward)
    tokens = response(vocab, before, after, 1)
    tokens[8] = vocab.ids["door_open"]
    assert reward_of(vocab, tokens, before, after).slot_rewards is None  # malformed: the penalty alone


def test_malformed_response_gets_only_the_format_penalty(doorkey):
    vocab, before, after = doorkey
    tokens = response(vocab, before, after, 1)
    tokens[8] = vocab.ids["door_open"]  # prediction's agent_dir slot holds a door state
    result = reward_of(vocab, tokens, before, after)
    assert result.reward == pytest.approx(-0.2)
    assert result.state_accuracy == 0.0 and result.prediction_accuracy == 0.0


def test_strategies_without_a_part_are_not_scored_on_it(doorkey):
    vocab, before, after = doorkey
    tokens = [before[f] for f in FIELDS] + [int(vocab.action_ids[1])]
    result = reward_of(vocab, tokens, before, after, strategy="StateEstimation")
    assert result.reward == pytest.approx(0.3) and math.isnan(result.prediction_accuracy)
    result = reward_of(vocab, [int(vocab.action_ids[1])], before, after, strategy="NoThink")
    assert result.reward == 0.0 and math.isnan(result.state_accuracy)


def test_state_fields_of_states_along_an_episode_are_consistent():
    env = make_env("MiniGrid-DoorKey-6x6-v0", seed=0)
    _, info = env.reset(seed=0)
    codec, vocab = StateCodec(6, 6), Vocab(6, 6)
    rng = np.random.default_rng(0)
    for _ in range(30):
        fields = state_fields(info["state"], codec, vocab)
        assert set(fields) == set(FIELDS)
        state = codec.decode(info["state"])
        assert fields["agent_pos"] == vocab.cell(*state.agent_pos)
        _, _, term, trunc, info = env.step(int(rng.integers(7)))
        if term or trunc:
            break


# --- the network -----------------------------------------------------------------------------


def _random_net(seed: int = 0, readout_weights: bool = True):
    from agents.vagen import VagenModelConfig, VagenNet, readout_positions

    env = make_env("MiniGrid-DoorKey-5x5-v0")
    base = env.unwrapped
    vocab = Vocab(base.width, base.height)
    frames = np.stack([env.reset(seed=s)[0] for s in range(8)])
    torch.manual_seed(seed)
    config = VagenModelConfig(
        vocab_size=len(vocab), grid_width=base.width, grid_height=base.height, tile_size=frames.shape[1] // base.height,
        max_response_len=15, num_actions=vocab.num_actions, first_cell_token=vocab.cell(0, 0),
        readout_tokens=vocab.attribute_tokens, readout_positions=readout_positions("WorldModeling", vocab), layers=2,
    )
    net = VagenNet(config).eval()
    if readout_weights:  # zero at the start: give it weights, so that the tests see it
        torch.nn.init.normal_(net.cell_readout.weight, std=0.5)
    return net, vocab, torch.from_numpy(frames)


def test_cached_decoding_equals_the_teacher_forced_pass():
    """generate decodes token by token with a key/value cache; its log-probs and values must be
    those of the full causal pass over the same tokens (what PPO trains on)."""
    from agents.vagen import generate, token_logprobs

    net, vocab, frames = _random_net()
    history = torch.randint(8, (len(frames), 2), generator=torch.Generator().manual_seed(1))
    gen = generate(net, frames, history, 15, vocab.first_action, torch.Generator().manual_seed(0))
    assert gen.mask.sum(-1).max() > 3  # some rows decode several tokens
    cells = (gen.tokens >= vocab.cell(0, 0)) & (gen.tokens < vocab.first_action) & gen.mask
    assert cells[:, :-1].any()  # some cell token is read back as an input
    logprobs, _, values = token_logprobs(net, frames, history, gen.tokens)
    assert torch.allclose(logprobs * gen.mask, gen.logprobs, atol=1e-5)
    assert torch.allclose(values * gen.mask, gen.values, atol=1e-5)
    # Teacher-forced logits at a later position do not depend on later tokens (causality).
    changed = gen.tokens.clone()
    changed[:, 6:] = vocab.first_action
    again, _, _ = token_logprobs(net, frames, history, changed)
    assert torch.allclose(again[:, :6], logprobs[:, :6], atol=1e-6)



def test_slot_entropy_is_the_entropy_over_the_tokens_a_slot_accepts():
    """With the slot mask, a position's entropy is that of its distribution renormalised over its
    slot's tokens, so it is log(slot size) at most; over the whole vocabulary it is larger."""
    from agents.vagen import slot_mask, token_logprobs

    net, vocab, frames = _random_net(readout_weights=False)  # a random read-out concentrates some slots' mass out of them
    mask = slot_mask("WorldModeling", vocab)
    assert mask.shape == (15, len(vocab)) and mask[-1].sum() == 7 and mask[0].sum() == 25  # actions; 5x5 cells
    history = torch.full((len(frames), 2), 7)
    tokens = torch.randint(len(vocab), (len(frames), 15), generator=torch.Generator().manual_seed(0))
    _, entropy, _ = token_logprobs(net, frames, history, tokens, mask)
    inputs = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
    logits, _ = net(frames, history, inputs)
    q = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    expected = -(q * q.clamp_min(1e-30).log()).sum(-1)
    assert torch.allclose(entropy, expected, atol=1e-5)
    assert (entropy <= mask.sum(-1).float().log() + 1e-5).all()
    _, vocab_entropy, _ = token_logprobs(net, frames, history, tokens)
    assert (vocab_entropy > entropy).all()  # the whole vocabulary also counts the format-breaking tokens


def test_the_action_slot_reads_the_frame_directly():
    """At the action slot the action tokens' logits also get the direct frame path (an MLP of the
    actor's frame encoder): it moves them there and nowhere else; the other tokens' logits, and
    every other slot, are the decoder's alone. The encoders see every tile: a changed tile changes
    the summary."""
    net, vocab, frames = _random_net()
    torch.nn.init.normal_(net.action_head[-1].weight, std=1.0)  # 0.01 gain at the start: make it visible
    history = torch.full((len(frames), 2), 7)
    inputs = torch.randint(1, vocab.first_action, (len(frames), 15), generator=torch.Generator().manual_seed(0))
    inputs[:, 0] = 0
    memory = net.encode(frames, history)
    logits, _ = net.decode(memory, inputs)
    memory.direct = torch.zeros_like(memory.direct)
    without, _ = net.decode(memory, inputs)
    A = vocab.first_action
    assert not torch.allclose(logits[:, -1, A:], without[:, -1, A:], atol=1e-3)
    assert torch.equal(logits[:, -1, :A], without[:, -1, :A]) and torch.equal(logits[:, :-1], without[:, :-1])
    changed = frames.clone()
    changed[:, :8, :8] = 255  # tile (0, 0)
    assert not torch.allclose(net.frame_encoder(net.encode(changed, history).pixels), net.frame_encoder(memory.pixels), atol=1e-4)


def test_cell_inputs_read_the_named_tile():
    """With cell inputs a cell token c{x},{y} enters the decoder with tile (x, y)'s pixel embedding
    added (tiles in row-major order, as the pointer logits score them); other tokens enter as before."""
    net, vocab, frames = _random_net()
    memory = net.encode(frames[:2], torch.full((2, 2), 7))
    inputs = torch.tensor([[0, vocab.cell(3, 1), vocab.ids["east"]], [0, vocab.cell(0, 2), vocab.none]])
    embedded, named = net._embed(memory, inputs)
    plain = net.token_embed(inputs)
    assert torch.equal(embedded[:, 0], plain[:, 0]) and torch.equal(embedded[:, 2], plain[:, 2])
    expected = plain[:, 1] + net.cell_input(torch.stack([memory.content[0, 1 * 5 + 3], memory.content[1, 2 * 5 + 0]]))
    assert torch.allclose(embedded[:, 1], expected, atol=1e-6)
    assert not torch.allclose(embedded[:, 1], plain[:, 1], atol=1e-3)
    assert torch.equal(named[:, 0], torch.zeros_like(named[:, 0])) and torch.equal(named[:, 2], torch.zeros_like(named[:, 2]))


def test_cell_readout_adds_the_named_tiles_pixels_at_the_slots_that_take_attributes():
    """After a cell token, at a slot that accepts attributes (a direction after the agent's cell, the
    door state after the door's cell), the attribute logits are those without the read-out plus a
    linear map of the named tile's pixels; every other logit, and every slot that cannot take an
    attribute (the next agent position, the action), is unchanged."""
    from agents.vagen import readout_positions

    net, vocab, frames = _random_net()
    positions = readout_positions("WorldModeling", vocab)
    slots = [slot for _, slot in template("WorldModeling")]
    assert [slots[i] for i in positions] == ["dir", "carry", "door"] * 2
    assert slots[positions[2] - 1] == "cell_or_none" and FIELDS[positions[2] - 1] == "door_pos"  # the door state reads the door's tile
    assert readout_positions("NoThink", vocab) == () and len(readout_positions("FreeThink", vocab)) == 12
    history = torch.full((len(frames), 2), 7)
    tokens = torch.full((len(frames), 15), vocab.cell(1, 1))  # every input after <bos> names tile (1, 1)
    inputs = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
    memory = net.encode(frames, history)
    with_readout, _ = net.decode(memory, inputs)
    weight = net.cell_readout.weight.detach().clone()
    torch.nn.init.zeros_(net.cell_readout.weight)
    without, _ = net.decode(memory, inputs)
    lo, hi = vocab.attribute_tokens
    assert vocab.names[lo:hi] == [*(f"carry_{n}" for n in ("key", "ball", "box")), "door_open", "door_closed", "door_locked", "east", "south", "west", "north"]
    extra = memory.pixels[:, 1 * 5 + 1] @ weight.T  # (B, attributes)
    for i in range(15):
        expected = without[:, i].clone()
        if i in positions:
            expected[:, lo:hi] += extra
        assert torch.allclose(with_readout[:, i], expected, atol=1e-5), i
    assert not torch.allclose(with_readout[:, positions[0], lo:hi], without[:, positions[0], lo:hi], atol=1e-3)



def test_generation_is_deterministic_for_a_seed():
    from agents.vagen import generate

    net, vocab, frames = _random_net()
    history = torch.full((len(frames), 2), 7)
    first = generate(net, frames, history, 15, vocab.first_action, torch.Generator().manual_seed(3))
    second = generate(net, frames, history, 15, vocab.first_action, torch.Generator().manual_seed(3))
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.logprobs, second.logprobs)


# --- evaluation --------------------------------------------------------------------------------


def _estimating_stand_in(spec: str, codec: StateCodec, vocab: Vocab):
    """A stand-in for the VAGEN agent whose figures are known: acts as the scripted policy ``spec``
    on the true state and writes that state as its estimate (StateEstimation), always well formed."""
    from agents.policy import ScriptedPolicy
    from agents.vagen import ParsedResponse

    class StandIn(ScriptedPolicy):
        def act(self, inp):
            actions = super().act(inp)
            self.last_responses = [
                ParsedResponse(True, int(a), state=state_fields(s, codec, vocab)) for a, s in zip(actions, inp.states)
            ]
            return actions

    return StandIn(spec, name=f"{spec}-estimating")


def test_vagen_evaluation_plays_through_run_real_and_reports_one_normalized_score(monkeypatch):
    """The VAGEN evaluation is run_real in batches, and its normalized_score is agents.evaluate's
    (R - R_random) / (R_oracle - R_random) with the random and oracle policies' real returns on the
    same seeds; the mean of R / R_opt per episode is reported apart, as return_ratio."""
    from omegaconf import OmegaConf

    import agents.vagen.train as vagen_train
    from agents.evaluate import normalized_score, reference_returns, run_real
    from agents.policy import make_policy
    from common.seeding import derive_seed
    from scripts.config import Config

    # Empty-5x5: the random policy reaches the goal on some seeds, so both ends of the score matter.
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"env": {"id": "MiniGrid-Empty-5x5-v0"}, "vagen": {"strategy": "StateEstimation"}})
    codec, vocab = vagen_train.agent_codec(cfg)
    agent = _estimating_stand_in("epsilon_oracle@0.5", codec, vocab)
    calls = []

    def spy(policy, env_cfg, seeds, *args, **kwargs):
        rollouts = run_real(policy, env_cfg, seeds, *args, **kwargs)
        calls.append((policy, list(seeds), rollouts))
        return rollouts

    monkeypatch.setattr(vagen_train, "run_real", spy)
    metrics = vagen_train.evaluate(agent, cfg, episodes=3, seed=0, batch=2)

    seeds = [derive_seed(0, k) for k in range(3)]
    assert [(policy, batch) for policy, batch, _ in calls] == [(agent, seeds[:2]), (agent, seeds[2:])]
    returns = np.concatenate([rollouts.returns for *_, rollouts in calls])
    assert metrics["return"] == pytest.approx(returns.mean())
    assert metrics["episode_length"] == pytest.approx(np.concatenate([r.lengths for *_, r in calls]).mean())
    oracle = run_real(make_policy("oracle"), cfg.env, seeds, None, 0).returns  # the oracle is deterministic
    assert metrics["oracle_return"] == pytest.approx(oracle.mean())
    assert metrics["random_return"] == reference_returns(cfg.env, seeds, derive_seed(0, 0, 8))["random"]
    assert 0.0 < metrics["random_return"] < metrics["oracle_return"]
    expected = (metrics["return"] - metrics["random_return"]) / (metrics["oracle_return"] - metrics["random_return"])
    assert metrics["normalized_score"] == pytest.approx(expected)
    assert metrics["normalized_score"] == normalized_score(metrics["return"], metrics["random_return"], metrics["oracle_return"])
    assert metrics["return_ratio"] == pytest.approx(np.mean(returns / oracle))  # the oracle's return is R_opt
    assert abs(metrics["return_ratio"] - metrics["normalized_score"]) > 1e-3  # two figures, not one under two names
    # Each turn's estimate is scored against the state before its step: the stand-in wrote that state.
    assert metrics["state_accuracy"] == 1.0 and metrics["format_rate"] == 1.0 and math.isnan(metrics["prediction_accuracy"])


# --- end to end --------------------------------------------------------------------------------


# A two-step corridor: MiniGrid's empty room with the agent two tiles west of the goal, facing it.
gym.register(
    "MiniGrid-VagenTwoStep-v0", entry_point="minigrid.envs:EmptyEnv",
    kwargs={"size": 5, "agent_start_pos": (1, 3), "agent_start_dir": 0, "max_steps": 10},
)
CORRIDOR = [  # the tiny preset, shortened: 1024 turns after 100 steps of format warm-up
    "--preset", "tiny", "run.seed=0", "env.id=MiniGrid-VagenTwoStep-v0", "vagen.total_env_steps=1024", "vagen.rollout_turns=16",
    "vagen.minibatch_turns=32", "vagen.format_warmup_steps=100", "vagen.eval_episodes=8",
]


@pytest.fixture(scope="module")
def corridor(tmp_path_factory):
    """strategy -> (run folder, metrics) of a corridor run, trained once per module."""
    from scripts.train_vagen import main

    root, runs = tmp_path_factory.mktemp("runs"), {}

    def run(strategy: str):
        if strategy not in runs:
            torch.set_num_threads(1)
            runs[strategy] = root / strategy, main([*CORRIDOR, f"run.root={root}", f"run.name={strategy}", f"vagen.strategy={strategy}"])
        return runs[strategy]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["NoThink", "FreeThink", "StateEstimation", "TransitionModeling", "WorldModeling"])
def test_a_tiny_run_learns_the_two_step_corridor(corridor, strategy):
    """Forward twice reaches the goal; a random policy rarely does within the 10-step limit. With each
    strategy a short run on a fixed seed learns it and keeps its format, and the strategies that
    write the state or the prediction write it above chance."""
    from agents.evaluate import normalized_score

    folder, metrics = corridor(strategy)
    assert metrics["random_return"] < 0.5 * metrics["oracle_return"]
    assert metrics["normalized_score"] > 0.6, metrics
    assert metrics["normalized_score"] == normalized_score(metrics["return"], metrics["random_return"], metrics["oracle_return"])
    assert metrics["format_rate"] > 0.8, metrics
    # Chance: a uniform guess within each field's slot type; malformed turns count 0.
    for part in ("state_accuracy", "prediction_accuracy"):
        if not math.isnan(metrics[part]):
            assert metrics[part] > metrics["chance_state_accuracy"] + 0.15, metrics
    assert math.isnan(metrics["state_accuracy"]) == (strategy not in ("StateEstimation", "WorldModeling"))
    saved = json.loads((folder / "metrics.json").read_text())["vagen"]
    assert saved["normalized_score"] == pytest.approx(metrics["normalized_score"])
    assert any((folder / "tb" / "vagen").iterdir())
    assert not (folder / "vagen.resume.pt").exists()


@pytest.mark.slow
def test_saved_agent_loads_through_the_common_interface(corridor):
    from agents.policy import PolicyInput, load_policy
    from agents.vagen import VagenAgent

    folder, _ = corridor("WorldModeling")
    agent = load_policy(folder / "vagen.pt")
    assert isinstance(agent, VagenAgent) and agent.strategy == "WorldModeling"
    assert agent.config["vagen"]["strategy"] == "WorldModeling"  # the checkpoint carries its config
    env = make_env("MiniGrid-VagenTwoStep-v0")
    frames = np.stack([env.reset(seed=s)[0] for s in range(3)])
    agent.reset(3, seed=0)
    first = agent.act(PolicyInput(frames=frames))
    assert first.shape == (3,) and first.dtype == np.int64 and ((0 <= first) & (first < 7)).all()
    agent.reset(3, seed=0)
    assert (agent.act(PolicyInput(frames=frames)) == first).all()  # same seed, same actions
    with pytest.raises(ValueError, match="frames"):
        agent.act(PolicyInput(states=np.zeros((3, 81), np.uint8)))


@pytest.mark.slow
def test_a_finished_run_is_not_retrained(corridor, capsys):
    from scripts.train_vagen import main

    folder, metrics = corridor("WorldModeling")
    before = (folder / "vagen.pt").stat().st_mtime_ns
    args = [*CORRIDOR, f"run.root={folder.parent}", "run.name=WorldModeling", "vagen.strategy=WorldModeling"]
    assert main(args) == metrics
    assert (folder / "vagen.pt").stat().st_mtime_ns == before
    assert "[vagen] complete" in capsys.readouterr().out


@pytest.mark.slow
def test_dream_option_trains_on_the_world_models_state_head(tmp_path, capsys):
    """Plumbing of vagen.world=dream with an untrained tokenizer and dynamics model: episodes are
    imagined, the truth is the state head's, and the final evaluation still runs in the real env."""
    from common.atomic import atomic_torch_save
    from scripts.train_vagen import main
    from tests.test_dynamics import SMALL
    from worldmodel.dynamics import DynamicsModel, DynamicsModelConfig, dynamics_checkpoint
    from worldmodel.tokenizer import Tokenizer, tokenizer_checkpoint
    from worldmodel.train_tokenizer import TokenizerStageConfig, model_config

    torch.manual_seed(0)
    tokenizer = Tokenizer(model_config(TokenizerStageConfig(), 8))
    model_dir = tmp_path / "wm"
    atomic_torch_save(model_dir / "tokenizer.pt", tokenizer_checkpoint(tokenizer))
    dynamics = DynamicsModel(DynamicsModelConfig(
        vocab_size=tokenizer.vocab_size, grid_height=5, grid_width=5, state_width=5, state_height=5, **SMALL))
    atomic_torch_save(model_dir / "dynamics.pt", dynamics_checkpoint(dynamics, tokenizer.identity))
    metrics = main([
        "--preset", "tiny", f"run.root={tmp_path}", "run.name=dream", "vagen.world=dream", f"vagen.world_model={model_dir}",
        "vagen.num_envs=2", "vagen.rollout_turns=4", "vagen.total_env_steps=8", "vagen.minibatch_turns=8",
        "vagen.format_warmup_steps=5", "vagen.eval_episodes=1", "env.max_steps=20",
    ])
    assert metrics["world"] == "dream" and metrics["truth"] == "the world model's state head"
    assert metrics["episodes"] == 1 and (tmp_path / "dream" / "vagen.pt").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", f"run.root={tmp_path}", "run.name=nowm", "vagen.world=dream", f"vagen.world_model={tmp_path / 'none'}"])
    assert exit_info.value.code == 1 and "tokenizer checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("strategy, history_len", [("NoThink", 0), ("WorldModeling", 2)])
def test_a_killed_run_resumes_from_its_resume_checkpoint(tmp_path, monkeypatch, strategy, history_len):
    """Also the end-to-end run of one value stream (NoThink, here without a turn history) and two
    (task; world-modeling)."""
    import agents.vagen.train as vagen_train
    from scripts.train_vagen import main

    args = [
        "--preset", "tiny", f"run.root={tmp_path}", "run.name=killed", "vagen.num_envs=2", "vagen.rollout_turns=4",
        "vagen.total_env_steps=24", "vagen.minibatch_turns=8", "vagen.checkpoint_every=1", "vagen.format_warmup_steps=5",
        "vagen.eval_episodes=1", "env.max_steps=20", f"vagen.strategy={strategy}", f"vagen.history_len={history_len}",
    ]

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed before the final evaluation")

    monkeypatch.setattr(vagen_train, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    resume = tmp_path / "killed" / "vagen.resume.pt"
    assert resume.is_file() and not (tmp_path / "killed" / "vagen.pt").exists()
    assert torch.load(resume, weights_only=False)["update"] == 2  # written after updates 1 and 2 of 3
    monkeypatch.undo()
    metrics = main(args)
    assert metrics["env_steps"] == 24 and (tmp_path / "killed" / "vagen.pt").is_file() and not resume.exists()
    saved = torch.load(tmp_path / "killed" / "vagen.pt", weights_only=False)
    assert saved["model_config"]["value_streams"] == (2 if strategy == "WorldModeling" else 1)



def test_a_bad_strategy_fails_naming_the_key(tmp_path, capsys):
    from scripts.train_vagen import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"run.root={tmp_path}", "run.name=bad", "vagen.strategy=Thinking"])
    assert exit_info.value.code == 2
    assert "vagen.strategy" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_egocentric_view_fails_naming_env_obs(tmp_path, capsys):
    from scripts import quickstart, train_vagen

    for main, extra in ((train_vagen.main, []), (quickstart.main, ["quickstart.vagen=true"])):
        with pytest.raises(SystemExit) as exit_info:
            main([f"run.root={tmp_path}", "run.name=ego", "env.obs=partial", *extra])
        assert exit_info.value.code == 2
        assert "env.obs: the VAGEN agent reads the full view" in capsys.readouterr().err
        assert not (tmp_path / "ego" / "vagen.pt").exists()




def test_a_checkpoint_of_the_old_layout_or_another_template_is_refused_by_name():
    """A policy saved by the single-module agent (no layout recorded), or with other state fields
    (another response length or order), cannot be read by today's code: loading it says why
    instead of acting on a network it cannot build or responses it would misread."""
    from agents.vagen import VagenAgent

    net, vocab, _ = _random_net()
    checkpoint = VagenAgent(net, "WorldModeling", vocab, 12, 1.0).checkpoint()
    assert VagenAgent.from_checkpoint(checkpoint).strategy == "WorldModeling"
    old = dict(checkpoint)
    del old["layout"]  # what agents/vagen.py wrote
    old["model_config"] = dict(checkpoint["model_config"], detach_critic=False, cell_readout="pixels", action_query=False)
    with pytest.raises(ValueError, match="layout 1.*single-module agent .agents/vagen.py.*pruned.*retrain"):
        VagenAgent.from_checkpoint(old)
    before_encoders = dict(checkpoint, layout=2)  # the package before the frame encoders
    with pytest.raises(ValueError, match="layout 2.*own frame encoders.*retrain"):
        VagenAgent.from_checkpoint(before_encoders)
    longer = dict(checkpoint, model_config=dict(checkpoint["model_config"], max_response_len=13))  # six fields, once
    with pytest.raises(ValueError, match="13-token responses but the template has 15 slots"):
        VagenAgent.from_checkpoint(longer)
    reordered = dict(checkpoint, fields=["agent_pos", "agent_dir", "carrying", "key_pos", "door_pos", "door", "goal_pos"])
    with pytest.raises(ValueError, match="another order .agent_pos, agent_dir, carrying, key_pos"):
        VagenAgent.from_checkpoint(reordered)


def test_the_action_vocabulary_is_the_envs():
    """The vocabulary's actions, the history's "none" and the malformed response's no-op come from
    the env's action count: Dynamic-Obstacles has three (left, right, forward) and no "done"."""
    from omegaconf import OmegaConf

    from agents.vagen.train import agent_codec
    from scripts.config import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"env": {"id": "MiniGrid-Dynamic-Obstacles-6x6-v0"}})
    _, vocab = agent_codec(cfg)
    assert vocab.num_actions == 3 and vocab.names[vocab.first_action :] == ["act_left", "act_right", "act_forward"]
    assert parse_response([vocab.bos], "NoThink", vocab).action == 0  # malformed: turn left, which moves nothing
    assert Vocab(5, 5).noop_action == 6 and Vocab(5, 5).names[-1] == "act_done"
    assert parse_response([int(Vocab(5, 5).action_ids[2])], "NoThink", Vocab(5, 5)).action == 2



def test_steps_to_0_9_is_the_first_evaluation_that_reaches_it_and_stays():
    from benchmarks.vagen import steps_to

    assert steps_to([[1000, 0.5], [2000, 0.92], [3000, 0.8], [4000, 0.95], [5000, 0.9]]) == 4000  # 2000 fell back
    assert steps_to([[1000, 0.5], [2000, 0.91]]) == 2000  # the last evaluation counts alone
    assert steps_to([[1000, 0.95], [2000, 0.5]]) is None and steps_to([]) is None


@pytest.mark.parametrize("env_id", ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-KeyCorridorS3R1-v0"])
def test_the_optimal_return_is_the_oracles_return_on_the_envs_own_task(env_id):
    """KeyCorridor's task is picking up the ball, not reaching a goal tile (which it has none of)."""
    from agents.vagen.train import optimal_return
    from envs.make import make_env
    from envs.oracle import Oracle, task_for_env
    from envs.state import StateCodec

    env = make_env(env_id)
    base = env.unwrapped
    codec = StateCodec(base.width, base.height)
    _, info = env.reset(seed=7)
    best = optimal_return(env, info["state"], codec)
    oracle, total, done = Oracle(codec, task_for_env(env)), 0.0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(oracle.action(info["state"]))
        total, done = total + reward, terminated or truncated
    assert total > 0 and best == pytest.approx(total)
