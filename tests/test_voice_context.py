"""Conversation context in fine-tuning samples (earlier turns before the target, laid out as generation lays out
its prompt, outside the loss by default) and long recordings cut into clips at quiet segment boundaries."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import ENGLISH, espeak_wav
from train.data import SKIPPED, DataConfig, DataError, Featurizer, dataset

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "She sells sea shells by the sea shore.",
             "Every morning the baker opens his shop early.", "A long walk in the park makes everyone happy.",
             "The train to the city leaves at nine tonight.", "Rain is falling softly on the quiet village."]
PAUSE = 0.6  # seconds of silence between the sentences of the long recording


@pytest.fixture(scope="module")
def featurizer():
    from csm_jax.io import audio, text
    return Featurizer(text.load_tokenizer(), audio.random_mimi(0), DataConfig())


def _samples(source, featurizer, **fields):
    cfg = DataConfig(**{"max_frames": 256, "batch_size": 1, **fields})
    return list(dataset(str(source), cfg, dataclasses.replace(featurizer, cfg=cfg), repeat=False))


def _rows(batches):
    """Every sample of the batches as (tokens, loss_mask) of its frames, sorted."""
    out = []
    for b in batches:
        for row in range(b["tokens"].shape[1]):
            tokens, loss, seg = b["tokens"][0, row], b["loss_mask"][0, row], b["segment_ids"][0, row]
            out += [(tokens[seg == s].tobytes(), loss[seg == s].tobytes()) for s in np.unique(seg[seg > 0])]
    return sorted(out)


@pytest.fixture(scope="module")
def conversation(tmp_path_factory) -> Path:
    """Four turns of one conversation (two speakers, rows out of order, a `turn` column) and one row whose
    `context` column names a turn and an id that does not exist."""
    d = tmp_path_factory.mktemp("conversation")
    rows = []
    for i, text in enumerate(ENGLISH):
        espeak_wav(d / f"t{i}.wav", text)
        rows.append({"id": f"t{i}", "audio": f"t{i}.wav", "text": text, "speaker": i % 2, "conversation": "c1",
                     "turn": i})
    rows = [rows[2], rows[0], rows[3], rows[1], {"id": "x", "audio": "t0.wav", "text": ENGLISH[0], "speaker": 1,
                                                 "context": "t3|nope"}]
    (d / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "talk.jsonl"


def test_turns_get_their_earlier_turns_and_a_missing_id_is_counted(conversation):
    from train.sources import context_ids, manifest_items

    SKIPPED.clear()
    items = {i["key"]: i.get("context") for i in manifest_items(conversation, DataConfig(context_turns=2))}
    assert items == {"t0": None, "t1": ["t0"], "t2": ["t0", "t1"], "t3": ["t1", "t2"], "x": ["t3"]}
    assert dict(SKIPPED) == {"missing context id": 1}
    assert all("context" not in i for i in manifest_items(conversation, DataConfig(context_turns=0)))
    for cell in ("a|b", "a, b", "a;b", "a b", ["a", "b"], '["a", "b"]'):
        assert context_ids(cell) == ["a", "b"]


def test_a_sample_with_context_is_laid_out_as_generation_lays_out_its_prompt(conversation, featurizer):
    from csm_jax.inference.prompt import prompt_frames
    from csm_jax.io.audio import encode
    from csm_jax.io.frames import Frames, Segment, audio_frames

    batches = _samples(conversation, featurizer, context_turns=2)
    assert len(batches) == 5
    audio = [sf.read(conversation.parent / f"t{i}.wav", dtype="float32")[0] for i in range(4)]
    prompt = prompt_frames(featurizer.tokenizer, featurizer.mimi, ENGLISH[3], 1,
                           [Segment(1, ENGLISH[1], audio[1]), Segment(0, ENGLISH[2], audio[2])])
    expected = Frames.concat([prompt, audio_frames(encode(featurizer.mimi, audio[3]))])
    n = len(expected)
    matches = [b for b in batches if int(b["segment_ids"].sum()) == n
               and np.array_equal(b["tokens"][0, 0, :n], expected.tokens)]
    assert len(matches) == 1
    row = matches[0]
    np.testing.assert_array_equal(row["mask"][0, 0, :n], expected.mask)
    context_length = n - len(featurizer.segment({"text": ENGLISH[3], "codes": encode(featurizer.mimi, audio[3]),
                                                 "meta": {"speaker_id": 1}}))
    assert context_length > 0
    loss = row["loss_mask"][0, 0]
    assert not loss[:context_length].any() and loss[context_length:n].all() and not loss[n:].any()
    everything = _samples(conversation, featurizer, context_turns=2, loss_on="all")
    assert all(b["loss_mask"][0, 0].sum() == b["segment_ids"].sum() for b in everything)


def test_a_datasets_dataset_with_a_conversation_column_gives_the_same_samples(conversation, featurizer, tmp_path):
    import datasets

    from train.sources import examples

    clips = [conversation.parent / f"t{i}.wav" for i in reversed(range(4))]  # rows in reverse turn order
    ds = datasets.Dataset.from_dict({"audio": [{"bytes": c.read_bytes(), "path": c.name} for c in clips],
                                     "text": ENGLISH[::-1], "spk": [1, 0, 1, 0], "session": ["s"] * 4,
                                     "turn": [3, 2, 1, 0]})
    ds.cast_column("audio", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "hf"))
    fields = {"conversation_column": "session", "speaker_column": "spk", "context_turns": 2}
    found = examples(str(tmp_path / "hf"), "hf", DataConfig(**fields))
    assert [found[i]["meta"].get("context") for i in range(4)] == [["hf:2", "hf:1"], ["hf:3", "hf:2"], ["hf:3"],
                                                                   None]
    from_hf = _rows(_samples(tmp_path / "hf", featurizer, **fields))
    assert len(from_hf) == 4 and set(from_hf) <= set(_rows(_samples(conversation, featurizer, context_turns=2)))

    named = ds.map(lambda row: {"spk": ["alice", "bob"][row["spk"]]})  # names are numbered in sorted order
    named.cast_column("audio", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "named"))
    by_name = examples(str(tmp_path / "named"), "hf", DataConfig(**fields))
    assert [by_name[i]["meta"]["speaker_id"] for i in range(4)] == [found[i]["meta"]["speaker_id"]
                                                                      for i in range(4)] == [1, 0, 1, 0]


def _turn(featurizer, text: str, frames: int, speaker: int, seed: int) -> dict:
    codes = np.random.default_rng(seed).integers(1, 2048, (32, frames))
    return {"key": text, "text": text, "codes": codes, "meta": {"speaker_id": speaker}}


def test_oldest_context_turns_are_dropped_to_fit_and_the_target_is_never_cut(featurizer):
    from csm_jax.io.frames import Frames

    turns = [_turn(featurizer, f"Turn number {i}.", 5 + i, i % 2, i) for i in range(4)]
    parts = [featurizer.segment(t) for t in turns]
    sample = {**turns[3], "context": turns[:3]}
    fit_two = len(parts[1]) + len(parts[2]) + len(parts[3])
    for limit, kept in ((fit_two + len(parts[0]), parts), (fit_two, parts[1:]), (fit_two - 1, parts[2:]),
                        (len(parts[3]), parts[3:])):
        f = dataclasses.replace(featurizer, cfg=DataConfig(max_frames=limit))
        frames = f.frames(sample)
        np.testing.assert_array_equal(frames["tokens"], Frames.concat(kept).tokens)
        assert frames["loss_mask"].sum() == len(parts[3]) and frames["loss_mask"][-len(parts[3]):].all()
    SKIPPED.clear()
    assert dataclasses.replace(featurizer, cfg=DataConfig(max_frames=len(parts[3]) - 1)).frames(sample) is None
    assert SKIPPED[f"longer than max_frames={len(parts[3]) - 1}"] == 1


def test_context_frames_condition_but_do_not_count_in_the_loss(featurizer):
    """The loss covers exactly the target turn's audio frames (every turn's with loss_on="all"): checked against
    cross-entropies summed by hand over frame positions found from the layout, not from the mask; the context
    still reaches the target's logits, and perturbing its codes changes the loss only through them."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from csm_jax.core.config import preset
    from csm_jax.core.sharding import make_mesh
    from train.trainer import OptimConfig, Trainer

    trainer = Trainer(preset("tiny_full_vocab"), OptimConfig(depth_fraction=1.0), make_mesh(-1, 1, 1),
                      compute_dtype=jnp.float32)
    params = trainer.init_state(0).params
    model = nnx.merge(trainer.graphdef, params)
    turns = [_turn(featurizer, f"Turn number {i}.", frames, i % 2, i) for i, frames in enumerate((6, 7, 8))]
    target_audio = 8 + 1  # the target's codes and its end frame close the sample

    def run(context, loss_on):
        f = dataclasses.replace(featurizer, cfg=DataConfig(max_frames=128, loss_on=loss_on))
        frames = f.frames({**turns[2], "context": context})
        batch = {"tokens": jnp.asarray(frames["tokens"][None]), "mask": jnp.asarray(frames["mask"][None]),
                 "loss_mask": jnp.asarray(frames["loss_mask"][None]),
                 "segment_ids": jnp.ones((1, len(frames["tokens"])), jnp.int32)}
        _, metrics = trainer._loss(params, batch, jax.random.key(0), training=False)
        logits, _ = model(batch["tokens"], batch["mask"], batch["segment_ids"])
        return frames, metrics, np.asarray(logits[0])

    def by_hand(frames, logits, positions):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[positions - 1], frames["tokens"][positions, 0])
        return float(np.mean(ce))

    frames, metrics, logits = run(turns[:2], "target")
    length = len(frames["tokens"])
    target = np.arange(length - target_audio, length)
    every_audio = np.flatnonzero(frames["mask"][:, 0])
    assert len(every_audio) == 6 + 1 + 7 + 1 + target_audio
    np.testing.assert_allclose(metrics["c0_loss"], by_hand(frames, logits, target), rtol=1e-5)
    assert int(metrics["audio_frames"]) == int(metrics["depth_frames"]) == target_audio

    _, all_metrics, _ = run(turns[:2], "all")
    np.testing.assert_allclose(all_metrics["c0_loss"], by_hand(frames, logits, every_audio), rtol=1e-5)
    assert int(all_metrics["audio_frames"]) == int(all_metrics["depth_frames"]) == len(every_audio)
    assert abs(float(all_metrics["c0_loss"]) - float(metrics["c0_loss"])) > 1e-3

    other = [{**t, "codes": np.random.default_rng(10 + i).integers(1, 2048, t["codes"].shape)}
             for i, t in enumerate(turns[:2])]
    changed, changed_metrics, changed_logits = run(other, "target")
    assert np.abs(changed_logits[target - 1] - logits[target - 1]).max() > 1e-3  # the context conditions
    np.testing.assert_array_equal(changed["tokens"][target], frames["tokens"][target])
    np.testing.assert_allclose(changed_metrics["c0_loss"], by_hand(changed, changed_logits, target), rtol=1e-5)


def test_packing_keeps_each_sample_with_its_context_and_loss_mask(conversation, featurizer):
    padded = _samples(conversation, featurizer, context_turns=3)
    packed = _samples(conversation, featurizer, context_turns=3, packing=True)
    assert len(packed) < len(padded)
    assert _rows(packed) == _rows(padded)


def test_prepare_encodes_each_clip_once_and_training_reads_context_from_the_records(conversation, featurizer,
                                                                                      tmp_path, monkeypatch):
    from csm_jax.io import audio
    from train.prepare import main

    encoded = []
    batch_encode = audio.encode_batch
    monkeypatch.setattr(audio, "encode_batch", lambda mimi, clips: encoded.extend(map(len, clips)) or
                        batch_encode(mimi, clips))
    assert main([str(conversation), str(tmp_path / "out"), "--mimi", "random", "--context-turns", "3",
                 "--workers", "2", "--worker", "0"]) == 0
    assert main([str(conversation), str(tmp_path / "out"), "--mimi", "random", "--context-turns", "3",
                 "--workers", "2", "--worker", "1"]) == 0
    assert len(encoded) == 5  # four turns and the extra row, each once, although turns serve as context 1-3 times

    def no_encoding(*args):
        raise AssertionError("prepared data must not be encoded again")

    on_the_fly = _samples(conversation, featurizer, context_turns=3, packing=True)
    monkeypatch.setattr(audio, "encode", no_encoding)
    prepared = _samples(tmp_path / "out", featurizer, context_turns=3, packing=True)
    assert _rows(prepared) == _rows(on_the_fly)
    assert len(_rows(prepared)) == 5 and any(not np.frombuffer(m, bool).all() for _, m in _rows(prepared))


def test_held_out_turns_never_reach_training_and_held_out_targets_are_scored_alone(conversation, featurizer,
                                                                                   monkeypatch):
    """With data.eval_fraction 0.6 the ids t0, t1 and x are held out (crc32 of the id below 0.6; t2 and t3 are
    not): x follows t3, a training turn. Training samples leave held-out turns out of their context, so no training
    sample reads their audio; eval samples keep every earlier turn as context and score the target alone."""
    from csm_jax.io.frames import Frames
    from train import data
    from train.data import in_split
    from train.sources import examples

    fields = {"context_turns": 3, "eval_fraction": 0.6, "loss_on": "all"}
    assert [k for k in ("t0", "t1", "t2", "t3", "x") if in_split(k, "eval", 0.6)] == ["t0", "t1", "x"]
    found = examples(str(conversation), "manifest", DataConfig(**fields))
    segment = {k: featurizer.segment(featurizer.encode(found.get(k))) for k in ("t0", "t1", "t2", "t3", "x")}

    def expected(turns, scored):
        parts = [segment[k] for k in turns]
        loss = np.concatenate([np.full(len(p), i >= len(parts) - scored) for i, p in enumerate(parts)])
        return Frames.concat(parts).tokens.tobytes(), loss.tobytes()

    read = []
    decode = data.decode_audio
    monkeypatch.setattr(data, "decode_audio", lambda example: read.append(example["key"]) or decode(example))
    cfg = DataConfig(max_frames=256, batch_size=1, **fields)
    f = dataclasses.replace(featurizer, cfg=cfg)
    trained = _rows(data.dataset(str(conversation), cfg, f, repeat=False, split="train"))
    assert set(read) == {"t2", "t3"}
    assert trained == sorted([expected(["t2"], 1), expected(["t2", "t3"], 2)])  # loss_on=all: every turn

    read.clear()
    held_out = _rows(data.dataset(str(conversation), cfg, f, repeat=False, split="eval"))
    assert set(read) == {"t0", "t1", "t3", "x"}
    assert held_out == sorted([expected(["t0"], 1), expected(["t0", "t1"], 1), expected(["t3", "x"], 1)])


def test_turns_encoded_on_the_fly_are_kept_by_key_encoded_once_and_give_the_same_samples(conversation, featurizer,
                                                                                        monkeypatch):
    """Without `prepare`, a pass makes the five rows targets and t0-t3 context turns seven times: kept by key,
    each clip is encoded once over two passes, into the samples that encoding every use gives in each pass. The
    least recently used turn goes first when the codes outgrow the budget."""
    from csm_jax.io import audio
    from train import data
    from train.sources import examples

    cfg = DataConfig(max_frames=256, batch_size=1, context_turns=3)
    f = dataclasses.replace(featurizer, cfg=cfg)
    found = examples(str(conversation), "manifest", cfg)
    size = {k: f.encode(found.get(k))["codes"].nbytes for k in ("t0", "t1", "t2")}
    calls = []
    encode = audio.encode
    monkeypatch.setattr(audio, "encode", lambda mimi, clip: calls.append(len(clip)) or encode(mimi, clip))

    def passes(budget, count):
        monkeypatch.setattr(data, "CACHED_CODES", budget)
        calls.clear()
        batches = iter(data.dataset(str(conversation), cfg, f))
        return [_rows([next(batches) for _ in range(5)]) for _ in range(count)]

    budget = data.CACHED_CODES
    [every_use] = passes(0, 1)
    assert len(calls) == 5 + 7
    assert passes(budget, 2) == [every_use, every_use] and len(calls) == 5

    turns = data.RecentTurns(f, found, budget=sum(size.values()) - 1)
    calls.clear()
    for key in ("t0", "t1", "t0", "t2", "t0", "t1"):  # t2 pushes out t1, the least recently used
        assert turns.context(key)["key"] == key
    assert len(calls) == 4 and list(turns.turns) == ["t0", "t1"] and turns.size == size["t0"] + size["t1"]


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, list[dict], list[tuple[float, float]]]:
    """Six espeak sentences joined by 0.6 s pauses into one 17 s file; its segments are half sentences, so every
    other boundary falls inside speech. Returns the file, the segments and the pauses (start, end)."""
    d = tmp_path_factory.mktemp("long")
    pieces, segments, pauses, t = [], [], [], 0.0
    for i, sentence in enumerate(SENTENCES):
        speech, rate = sf.read(espeak_wav(d / f"s{i}.wav", sentence), dtype="float32")
        voiced = np.flatnonzero(np.abs(speech) > 1e-3)
        speech = speech[voiced[0]:voiced[-1] + 1]
        length = len(speech) / rate
        words = sentence.split()
        segments += [{"start": t, "end": t + length / 2, "text": " ".join(words[:len(words) // 2])},
                     {"start": t + length / 2, "end": t + length, "text": " ".join(words[len(words) // 2:])}]
        pauses.append((t + length, t + length + PAUSE))
        pieces += [speech, np.zeros(int(PAUSE * rate), np.float32)]
        t += length + PAUSE
    sf.write(d / "long.wav", np.concatenate(pieces), 24000)
    return d / "long.wav", segments, pauses


def test_a_long_recording_is_cut_at_quiet_segment_boundaries(recording, featurizer, tmp_path):
    import csv

    from train.sources import manifest_items

    wav, segments, pauses = recording
    (tmp_path / "long.wav").write_bytes(wav.read_bytes())
    row = {"id": "talk", "audio": "long.wav", "text": " ".join(SENTENCES), "speaker": 1}
    (tmp_path / "m.jsonl").write_text(json.dumps({**row, "segments": segments}) + "\n"
                                      + json.dumps({**row, "id": "by-words", "words": segments}) + "\n")
    cfg = DataConfig(clip_seconds=(2.0, 5.0))
    items = manifest_items(tmp_path / "m.jsonl", cfg)
    clips = [i for i in items if i["key"].startswith("talk#")]
    assert len(clips) >= 3
    for clip in clips:
        assert 2.0 <= clip["end"] - clip["start"] <= 5.0 and clip["speaker_id"] == 1
    # a cut inside speech would give longer clips here (e.g. 0 to 4.2 s): every cut lies in a pause instead
    for before, after in zip(clips[:-1], clips[1:]):
        assert any(start <= before["end"] <= after["start"] <= end for start, end in pauses)
    assert " ".join(c["text"] for c in clips) == " ".join(s["text"] for s in segments)
    assert [c.get("context") for c in clips[:3]] == [None, ["talk#0"], ["talk#0", "talk#1"]]
    by_words = [i for i in items if i["key"].startswith("by-words#")]
    assert [(c["start"], c["end"], c["text"]) for c in by_words] == [(c["start"], c["end"], c["text"])
                                                                       for c in clips]

    with open(tmp_path / "m.csv", "w", newline="") as f:  # a CSV cell holds the segments as JSON text
        writer = csv.DictWriter(f, fieldnames=[*row, "segments"])
        writer.writeheader()
        writer.writerow({**row, "segments": json.dumps(segments)})
    assert [(c["start"], c["end"]) for c in manifest_items(tmp_path / "m.csv", cfg)] == [
        (c["start"], c["end"]) for c in clips]

    SKIPPED.clear()
    samples = _samples(tmp_path / "m.jsonl", featurizer, clip_seconds=(2.0, 5.0), max_duration=5.0, max_frames=512)
    assert len(samples) == 2 * len(clips) and not SKIPPED


def test_a_long_recording_without_times_is_skipped_not_cut(recording, featurizer, tmp_path):
    wav, _, _ = recording
    (tmp_path / "long.wav").write_bytes(wav.read_bytes())
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "long.wav", "text": " ".join(SENTENCES)}) + "\n"
                                      + json.dumps({"audio": "long.wav", "text": "x", "segments": "[{}]"}) + "\n")
    SKIPPED.clear()
    with pytest.raises(DataError, match="duration filter 1"):
        _samples(tmp_path / "m.jsonl", featurizer, max_duration=15.0, max_frames=512)
    assert SKIPPED["bad segments"] == 1


def test_words_without_times_join_the_timed_word_before_them():
    from train.clips import spans

    words = [{"word": "Pay"}, {"word": "it", "start": 0.1, "end": 0.3}, {"word": "costs", "start": 0.3, "end": 0.6},
             {"word": "$5"}, {"word": "and"}, {"word": "today", "start": 1.2, "end": 1.5}]
    got = spans(words, speaker="2")
    assert [(s.start, s.end, s.text, s.speaker) for s in got] == [
        (0.1, 0.3, "Pay it", "2"), (0.3, 0.6, "costs $5 and", "2"), (1.2, 1.5, "today", "2")]
    assert spans([{"word": "$5"}, {"text": "10%"}]) is None  # nothing timed: the row is skipped as bad segments
    assert spans([{"word": "a", "start": 0.0}]) is None  # half a time is malformed, not untimed
    assert spans([{"word": "a", "start": 0.0, "end": 0.2}, "b"]) is None


def test_context_and_clip_settings_are_checked(conversation, tmp_path):
    from train.config import TrainConfigError, load_config, validate

    base = [f"data.source={conversation}", f"workdir={tmp_path / 'run'}"]
    cfg = load_config("train/configs/lora_voice.py", base)
    validate(cfg)
    assert (cfg.data.context_turns, cfg.data.loss_on) == (3, "target")
    for override, message in (("data.loss_on=context", "data.loss_on='context' is not one of target, all"),
                              ("data.clip_seconds=(15,3)", "0 < shortest < longest"),
                              ("data.context_turns=-1", "must not be negative")):
        with pytest.raises(TrainConfigError, match=message):
            validate(load_config("train/configs/lora_voice.py", [*base, override]))


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    """Three turns of two espeak voices (A, B, A) joined by 0.3 s pauses into one file, and a diarised transcript:
    each turn as two segments labelled with its speaker, B's first segment dated 0.1 s into A's last (overlapping
    speech, as diarisation gives). Returns the file and the segments of each turn."""
    d = tmp_path_factory.mktemp("dialogue")
    pieces, turns, t = [], [], 0.0
    for i, (speaker, voice) in enumerate((("SPEAKER_00", "en-us"), ("SPEAKER_01", "en-gb"), ("SPEAKER_00", "en-us"))):
        speech, rate = sf.read(espeak_wav(d / f"s{i}.wav", ENGLISH[i], voice), dtype="float32")
        voiced = np.flatnonzero(np.abs(speech) > 1e-3)
        speech = speech[voiced[0]:voiced[-1] + 1]
        length, words = len(speech) / rate, ENGLISH[i].split()
        early = 0.4 if i == 1 else 0.0  # the pause, and 0.1 s into A's speech
        turns.append([{"start": t - early, "end": t + length / 2, "text": " ".join(words[:len(words) // 2]),
                       "speaker": speaker},
                      {"start": t + length / 2, "end": t + length, "text": " ".join(words[len(words) // 2:]),
                       "speaker": speaker}])
        pieces += [speech, np.zeros(int(0.3 * rate), np.float32)]
        t += length + 0.3
    sf.write(d / "dialogue.wav", np.concatenate(pieces), 24000)
    return d / "dialogue.wav", turns


def test_a_diarised_recording_is_cut_at_every_speaker_change_into_turns_of_one_conversation(dialogue, featurizer,
                                                                                           tmp_path):
    from csm_jax.io.frames import Frames
    from train.sources import examples, manifest_items

    wav, turns = dialogue
    (tmp_path / "dialogue.wav").write_bytes(wav.read_bytes())
    segments = [s for turn in turns for s in turn]
    unlabelled = [{k: v for k, v in s.items() if k != "speaker"} for s in segments]
    first_labelled = [*segments[:2], *unlabelled[2:]]
    rows = [{"id": "talk", "audio": "dialogue.wav", "text": "", "segments": segments},
            {"id": "solo", "audio": "dialogue.wav", "text": "", "speaker": "alice", "segments": unlabelled},
            {"id": "mixed", "audio": "dialogue.wav", "text": "", "speaker": "alice", "segments": first_labelled}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(clip_seconds=(2.0, 15.0), context_turns=2)  # the whole recording would fit one clip
    items = {i["key"]: i for i in manifest_items(tmp_path / "m.jsonl", cfg)}
    # names of rows and segments numbered together in sorted order: SPEAKER_00 0, SPEAKER_01 1, alice 2
    assert [(k, i["speaker_id"], i.get("context")) for k, i in items.items() if k.startswith("talk")] == [
        ("talk#0", 0, None), ("talk#1", 1, ["talk#0"]), ("talk#2", 0, ["talk#0", "talk#1"])]
    for i, turn in enumerate(turns):  # each clip holds its turn's spans whole, overlapping speech included
        clip = items[f"talk#{i}"]
        assert clip["start"] <= turn[0]["start"] and turn[-1]["end"] <= clip["end"] and clip["text"] == ENGLISH[i]
    assert items["talk#0"]["end"] > items["talk#1"]["start"]
    assert [(k, i["speaker_id"]) for k, i in items.items() if k.startswith("solo")] == [("solo#0", 2)]  # as before
    assert [(k, i["speaker_id"], i["text"]) for k, i in items.items() if k.startswith("mixed")] == [
        ("mixed#0", 0, ENGLISH[0]), ("mixed#1", 2, " ".join(ENGLISH[1:3]))]

    (tmp_path / "talk.jsonl").write_text(json.dumps(rows[0]) + "\n")
    samples = _samples(tmp_path / "talk.jsonl", featurizer, clip_seconds=(2.0, 15.0), context_turns=2)
    found = examples(str(tmp_path / "talk.jsonl"), "manifest", cfg)
    encoded = [featurizer.encode(found.get(f"talk#{i}")) for i in range(3)]
    for last in range(3):  # each turn after its earlier turns, every one with its own speaker's id
        expected = Frames.concat([featurizer.segment(e) for e in encoded[:last + 1]])
        n = len(expected)
        assert sum(int(b["segment_ids"].sum()) == n and np.array_equal(b["tokens"][0, 0, :n], expected.tokens)
                   for b in samples) == 1
    assert [e["meta"]["speaker_id"] for e in encoded] == [0, 1, 0]
