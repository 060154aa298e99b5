"""Tokenizer: the discrete interface, exactness after a short tiny-preset training, checkpoints,
and the training script end to end (one collection + one training shared by the module)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from common.atomic import atomic_torch_save
from envs.collect import random_frames
from worldmodel.tokenizer import (
    Tokenizer,
    TokenizerCheckpointError,
    TokenizerConfig,
    frames_to_patches,
    load_tokenizer,
    reconstruction_stats,
    tokenizer_checkpoint,
)

# ------------------------------------------------------------------------- untrained model


@pytest.fixture(scope="module", params=[("fsq", "regression"), ("vq", "categorical")], ids=lambda p: "-".join(p))
def fresh(request) -> Tokenizer:
    """An untrained tokenizer with a vocabulary of 16, for each bottleneck and decoder output."""
    quantizer, output = request.param
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(patch_size=8, hidden_dim=16, num_layers=1, quantizer=quantizer, fsq_levels=[4, 4],
                                     codebook_size=16, code_dim=4, commitment_weight=0.25, dead_code_threshold=0.01,
                                     decoder_output=output, intensity_dim=4))


def test_encode_decode_shapes_dtypes_and_determinism(fresh):
    frames = random_frames("MiniGrid-DoorKey-5x5-v0", [1, 2], steps=5)[:6].reshape(2, 3, 40, 40, 3)
    tokens = fresh.encode(frames)
    assert tokens.shape == (2, 3, 5, 5) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < fresh.vocab_size == 16
    decoded = fresh.decode(tokens)
    assert decoded.shape == (2, 3, 40, 40, 3) and decoded.dtype == torch.uint8
    # Deterministic, and independent of the batch a frame comes in.
    assert torch.equal(fresh.encode(frames), tokens)
    assert torch.equal(fresh.encode(frames[1, 2]), tokens[1, 2])
    assert torch.equal(fresh.decode(tokens), decoded)
    # The decode table is exactly the decoder network, token by token.
    assert torch.equal(fresh.decode_network(tokens.reshape(6, 5, 5)), decoded.reshape(6, 40, 40, 3))


def test_encoder_sees_one_block_shape_whatever_the_batch(fresh, monkeypatch):
    """A matrix product's rounding depends on its shape: a tile near a quantisation boundary got
    one code alone and another in a 4096-frame batch (egocentric DoorKey-5x5's key tile). Every
    encoder pass now has ENCODE_BLOCK rows, so what else is in the batch cannot move a tile's code."""
    from worldmodel import tokenizer as module

    shapes = []
    original = type(fresh).encode_latents

    def recording(self, patches):
        shapes.append(tuple(patches.shape[:3]))
        return original(self, patches)

    monkeypatch.setattr(type(fresh), "encode_latents", recording)
    frames = random_frames("MiniGrid-DoorKey-5x5-v0", list(range(30)), steps=30)
    many = fresh.encode(frames)
    one = fresh.encode(frames[7])
    assert shapes and set(shapes) == {(1, 1, module.ENCODE_BLOCK)}
    assert torch.equal(one, many[7])


def test_decode_table_follows_weight_changes(fresh):
    model = Tokenizer(fresh.config)
    model.load_state_dict(fresh.state_dict())
    tokens = torch.arange(16).view(4, 4)
    before = model.decode(tokens)
    with torch.no_grad():
        model.decoder[-1].weight.mul_(-3.0)  # changes every decoded patch
    after = model.decode(tokens)
    assert not torch.equal(before, after)
    assert torch.equal(after, model.decode_network(tokens[None])[0])


def test_bad_inputs_fail_clearly(fresh):
    with pytest.raises(ValueError, match="uint8"):
        fresh.encode(np.zeros((1, 40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of the tokenizer's patch size 8"):
        fresh.encode(np.zeros((1, 44, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\)"):
        fresh.encode(np.zeros((1, 40, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 16\)"):
        fresh.decode(torch.full((2, 2), 16))
    with pytest.raises(ValueError, match="quantizer"):
        dataclasses.replace(fresh.config, quantizer="kmeans")


def test_frames_to_patches_row_major():
    frames = np.arange(2 * 16 * 24 * 3, dtype=np.int64).reshape(2, 16, 24, 3).astype(np.uint8)
    patches = frames_to_patches(frames, 8)
    assert patches.shape == (2 * 2 * 3, 8, 8, 3)
    assert np.array_equal(patches[4], frames[0, 8:16, 8:16])  # frame 0, tile row 1, column 1


def test_reconstruction_stats_hand_computed():
    real = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    recon = real.copy()
    recon[1, 0, 0, 0] = 10  # one wrong channel in one pixel of the second frame
    stats = reconstruction_stats(real, recon)
    assert stats["exact_frame_rate"] == 0.5
    assert stats["pixel_accuracy"] == pytest.approx(7 / 8)
    assert stats["mse"] == pytest.approx(100 / 24)


# ------------------------------------------------------------------------- trained on the tiny preset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Collect the tiny dataset and train the tokenizer on it through the entry points."""
    from scripts import collect as collect_script
    from scripts import train_tokenizer

    root = tmp_path_factory.mktemp("runs")
    argv = ["--preset", "tiny", f"run.root={root}", "run.name=tok", "run.threads=1"]
    collect_script.main(argv)
    metrics = train_tokenizer.main(argv)
    return root / "tok", argv, metrics


def test_script_writes_its_artifacts(tiny_run):
    run, _, metrics = tiny_run
    assert (run / "tokenizer.pt").is_file()
    assert not (run / "tokenizer.resume.pt").exists()
    assert (run / "media" / "tokenizer_reconstruction.png").is_file()
    assert any((run / "tb" / "tokenizer").iterdir())
    saved = json.loads((run / "metrics.json").read_text())["tokenizer"]
    assert saved["identity"] == metrics["identity"] == load_tokenizer(run / "tokenizer.pt").identity
    assert saved["train_tiles_exact_rate"] == 1.0


def test_trained_tokenizer_is_exact_on_held_out_layouts(tiny_run):
    run, _, _ = tiny_run
    tokenizer = load_tokenizer(run / "tokenizer.pt", tile_size=8, frame_shape=(40, 40, 3))
    # Seeds far from the tiny collection's (0..7): layouts it never saw.
    frames = random_frames("MiniGrid-DoorKey-5x5-v0", [5000, 5001, 5002, 5003], steps=30)
    tokens = tokenizer.encode(frames)
    assert tokens.shape == (len(frames), 5, 5)
    stats = reconstruction_stats(frames, tokenizer.decode(tokens))
    # A random-weight model reconstructs no frame exactly; a trained one should all of them.
    assert stats["exact_frame_rate"] >= 0.9, stats
    # Same tiles on a bigger grid: the per-tile model carries over (Empty-8x8: walls, floor, goal, agent).
    bigger = random_frames("MiniGrid-Empty-8x8-v0", [7], steps=20)
    assert reconstruction_stats(bigger, tokenizer.decode(tokenizer.encode(bigger)))["exact_frame_rate"] >= 0.9


def test_save_load_gives_identical_tokens(tiny_run, tmp_path):
    run, _, _ = tiny_run
    tokenizer = load_tokenizer(run / "tokenizer.pt")
    frames = random_frames("MiniGrid-DoorKey-5x5-v0", [42], steps=10)
    copy_path = tmp_path / "copy.pt"
    atomic_torch_save(copy_path, tokenizer_checkpoint(tokenizer))
    again = load_tokenizer(copy_path, identity=tokenizer.identity)
    assert torch.equal(again.encode(frames), tokenizer.encode(frames))
    assert torch.equal(again.decode(again.encode(frames)), tokenizer.decode(tokenizer.encode(frames)))


def test_mismatched_checkpoint_fails_clearly(tiny_run, tmp_path):
    run, _, _ = tiny_run
    path = run / "tokenizer.pt"
    vocab = load_tokenizer(path).vocab_size
    with pytest.raises(TokenizerCheckpointError, match="tile size 8 px, but frames use tile size 16"):
        load_tokenizer(path, tile_size=16)
    with pytest.raises(TokenizerCheckpointError, match=f"vocabulary size {vocab}, but 7 was expected"):
        load_tokenizer(path, vocab_size=7)
    with pytest.raises(TokenizerCheckpointError, match="cannot tokenize frames of shape"):
        load_tokenizer(path, frame_shape=(44, 40, 3))
    with pytest.raises(TokenizerCheckpointError, match="retrained"):
        load_tokenizer(path, identity="tokenizer-0000000000000000")
    with pytest.raises(TokenizerCheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(TokenizerCheckpointError, match="not a tokenizer checkpoint"):
        load_tokenizer(other)


def test_a_vocabulary_smaller_than_the_tiles_exits_2_naming_the_key(tiny_run, capsys):
    from scripts import train_tokenizer

    run, argv, _ = tiny_run
    other = [a for a in argv if not a.startswith("run.name=")] + ["run.name=tok_small", f"data.path={run / 'dataset'}"]
    with pytest.raises(SystemExit) as exit_info:
        train_tokenizer.main(other + ["tokenizer.codebook_size=4"])
    assert exit_info.value.code == 2
    assert "tokenizer.codebook_size" in capsys.readouterr().err
    assert not (run.parent / "tok_small" / "tokenizer.pt").exists()


def test_finished_stage_is_skipped_and_a_changed_config_reruns(tiny_run, capsys):
    import shutil

    from scripts import train_tokenizer

    run, argv, metrics = tiny_run
    stamp = (run / "tokenizer.pt").stat().st_mtime_ns
    assert train_tokenizer.main(argv)["identity"] == metrics["identity"]
    assert (run / "tokenizer.pt").stat().st_mtime_ns == stamp
    assert "[tokenizer] complete" in capsys.readouterr().out
    # A copied (or moved) run is still complete: no absolute path is part of an identity.
    copy = run.parent / "tok_copy"
    shutil.copytree(run, copy)
    copied = [a for a in argv if not a.startswith("run.name=")] + ["run.name=tok_copy"]
    train_tokenizer.main(copied)
    assert "[tokenizer] complete" in capsys.readouterr().out
    # A changed key reruns the stage and keeps the old artifact under its identity.
    before = (copy / "tokenizer.pt").read_bytes()
    train_tokenizer.main(copied + ["tokenizer.hidden_dim=7"])
    out = capsys.readouterr().out
    assert "tokenizer.hidden_dim: 64 -> 7" in out and "[tokenizer] done" in out
    kept = [p for p in copy.glob("tokenizer.*.pt") if p.name != "tokenizer.pt"]
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert load_tokenizer(copy / "tokenizer.pt").config.hidden_dim == 7


def test_killed_training_resumes_to_the_same_weights(tiny_run, monkeypatch):
    from common.config import load_config
    from common.runs import RunDir
    from envs.dataset import EpisodeDataset
    from scripts.config import Config
    from worldmodel import train_tokenizer as loop

    run_path, _, _ = tiny_run
    frames = EpisodeDataset.load(run_path / "dataset").frames

    def run_dir(name: str):
        argv = ["--preset", "tiny", f"run.root={run_path.parent}", f"run.name={name}", "run.threads=1",
                "tokenizer.steps=30", "tokenizer.checkpoint_every=15", "tokenizer.stop_when_exact=false"]
        cfg = load_config(Config, argv, use_run_config=False)
        return cfg, RunDir(cfg, "tokenizer", argv)

    cfg, run = run_dir("straight")
    straight = loop.train(cfg, run, frames, frames[:50])

    cfg, run = run_dir("killed")
    calls = {"n": 0}
    original = Tokenizer.compute_loss

    def dies_at_step_20(self, batch):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(Tokenizer, "compute_loss", dies_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, run, frames, frames[:50])
    monkeypatch.setattr(Tokenizer, "compute_loss", original)
    assert (run / "tokenizer.resume.pt").is_file() and not (run / "tokenizer.pt").exists()
    resumed = loop.train(cfg, run, frames, frames[:50])
    assert not (run / "tokenizer.resume.pt").exists()
    assert resumed["identity"] == straight["identity"]  # same weights as if never killed


def test_distinct_rows_is_exact_even_on_hash_collisions(monkeypatch):
    import worldmodel.tokenizer as module

    rows = torch.randint(0, 3, (400, 16), dtype=torch.uint8)
    distinct, inverse = module._distinct_rows(rows)
    assert torch.equal(distinct[inverse], rows) and len(distinct) == len(torch.unique(rows, dim=0))
    monkeypatch.setattr(module, "_row_keys", lambda r: torch.zeros(len(r), dtype=torch.int64))  # all collide
    distinct, inverse = module._distinct_rows(rows)
    assert torch.equal(distinct[inverse], rows) and len(distinct) == len(torch.unique(rows, dim=0))


def test_unique_tiles_by_chunks_equal_the_whole_at_once():
    from worldmodel.train_tokenizer import unique_tiles

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, size=(7, 8, 8, 3), dtype=np.uint8)
    frames = tiles[rng.integers(0, 7, size=(50, 3, 4))].transpose(0, 1, 3, 2, 4, 5).reshape(50, 24, 32, 3)
    whole, whole_counts = unique_tiles(frames, 8, chunk=len(frames))
    parts, part_counts = unique_tiles(frames, 8, chunk=7)
    assert np.array_equal(whole, parts) and np.array_equal(whole_counts, part_counts)
    assert whole_counts.sum() == 50 * 12 and len(whole) == len(np.unique(tiles.reshape(7, -1), axis=0))
