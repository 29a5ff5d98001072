"""Long texts, dialogues and batches: text splitting, the rolling context inside the frame budget, crossfades, the
command line's three modes, and best-of-N; tiny random CSM + random Mimi + the shipped tokenizer."""

import json

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from csm_jax.core.config import preset
from csm_jax.core.model import Csm
from csm_jax.generate import main
from csm_jax.inference.end_of_speech import EndOfSpeech
from csm_jax.inference.generator import Generator, Request
from csm_jax.inference.longform import Turn, conversation_prompt, crossfade_join, generate_conversation, split_text
from csm_jax.inference.prompt import PromptTooLongError
from csm_jax.inference.score import best_of_n
from csm_jax.io import audio
from csm_jax.io.checkpoint import save_model
from csm_jax.io.frames import Frames, Segment, segment_frames, text_frames
from csm_jax.io.text import load_tokenizer
from tests.helpers import espeak_wav

CONFIG = preset("tiny_full_vocab")  # backbone max_seq_len 256: the rolling context must drop turns


@pytest.fixture(scope="module")
def model():
    return Csm(CONFIG, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, load_tokenizer(), audio.random_mimi(0))


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory):
    return espeak_wav(tmp_path_factory.mktemp("voice") / "voice.wav", "hello")


def long_text(words: int, seed: int = 0) -> str:
    """Sentences of 20..75 words with commas, one 150-word sentence with clauses, one 130-word run-on."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "river", "quietly", "ran", "under", "old", "stones", "and", "a", "child", "saw", "it", "light"]
    out, count = [], 0
    while count < words:
        n = 150 if len(out) == 3 else 130 if len(out) == 7 else int(rng.integers(20, 76))
        ws = list(rng.choice(vocab, n))
        if len(out) != 7:
            for i in range(5, n - 1, 9):
                ws[i] += ","
        out.append(" ".join(ws).capitalize() + rng.choice([".", "!", "?"]))
        count += n
    return " ".join(out)


def test_split_keeps_every_word_in_order_within_the_limit():
    text = long_text(3000)
    pieces = split_text(text, 40)
    assert " ".join(pieces).split() == text.split()
    assert all(1 <= len(p.split()) <= 40 for p in pieces)
    assert split_text("One. Two! Three?  Four") == ["One.", "Two!", "Three?", "Four"]
    assert split_text("a b c, d e f, g h", 4) == ["a b c,", "d e f,", "g h"]  # clauses first
    assert split_text("a b c d e f g", 3) == ["a b c", "d e f", "g"]  # then words


def test_conversation_prompt_keeps_the_latest_turns_that_fit():
    def frames(length, mark):
        return text_frames([mark] * length)

    pinned, history, target = [frames(10, 1)], [frames(50, 2), frames(40, 3), frames(30, 4), frames(20, 5)], frames(15, 6)
    prompt, kept = conversation_prompt(pinned, history, target, max_frames=100, max_seq_len=256)
    assert kept == 3 and len(prompt) == 10 + 40 + 30 + 20 + 15 < 256 - 100  # 50 more would not fit
    np.testing.assert_array_equal(prompt.tokens, Frames.concat([pinned[0], *history[1:], target]).tokens)
    with pytest.raises(PromptTooLongError, match="lower max_audio_length_ms"):
        conversation_prompt(pinned, history, frames(150, 6), max_frames=100, max_seq_len=256)


def test_a_3000_word_text_runs_in_order_within_the_budget_with_the_voice_pinned(generator, voice_wav):
    pieces = split_text(long_text(3000, seed=1), 80)
    voice = Segment(0, "hello", audio.read_audio(voice_wav))
    tokenizer, n = generator.tokenizer, 32
    pinned_len = len(segment_frames(tokenizer, voice, audio.encode(generator.mimi, voice.audio), n))
    done = []
    results = generate_conversation(generator, [Turn(0, t) for t in pieces], context=[voice],
                                    max_audio_length_ms=160, end_of_speech=EndOfSpeech(),
                                    on_turn=lambda i, r: done.append(i))
    assert done == list(range(len(pieces))) and len(results) == len(pieces) > 35
    history = []
    for i, (text, r) in enumerate(zip(pieces, results)):
        target = len(segment_frames(tokenizer, Segment(0, text), None, n))
        kept = history[len(history) - r.context_turns:] if r.context_turns else []
        assert r.prompt_frames == pinned_len + sum(kept) + target  # the voice, the latest turns, the text
        assert r.prompt_frames + 2 < 256  # the budget: prompt + 2 frames to generate
        if r.context_turns < len(history):  # dropped the oldest only because the next one did not fit
            assert r.prompt_frames + history[-r.context_turns - 1] + 2 >= 256
        assert r.generated and 0 < r.codes.shape[1] <= 2 and len(r.audio) == r.codes.shape[1] * 1920
        history.append(len(segment_frames(tokenizer, Segment(0, text), r.codes, n)))
    assert min(r.context_turns for r in results[1:]) >= 1
    assert any(r.context_turns < i for i, r in enumerate(results))


def test_crossfade_is_equal_power_and_shortened_for_short_pieces():
    a, b, c = np.ones(2400, np.float32), np.ones(1200, np.float32), np.full(100, 0.5, np.float32)
    out = crossfade_join([a, b, c], fade_ms=30)  # 720-sample fades; the last join only 100
    assert len(out) == 2400 + 1200 + 100 - 720 - 100
    np.testing.assert_array_equal(out[:2400 - 720], 1.0)
    overlap = out[2400 - 720:2400]
    t = (np.arange(720) + 0.5) / 720 * np.pi / 2
    np.testing.assert_allclose(overlap, np.cos(t) + np.sin(t), rtol=1e-6)  # cos^2 + sin^2 = 1: power kept
    np.testing.assert_allclose(crossfade_join([a], 30), a)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return str(save_model(model, tmp_path_factory.mktemp("ckpt") / "ckpt"))


COMMON = ["--mimi", "random", "--no-watermark", "--max-audio-length-ms", "240"]


def test_cli_dialogue_writes_the_conversation_and_each_turn(checkpoint, voice_wav, tmp_path):
    script = tmp_path / "talk.jsonl"
    sf.write(str(tmp_path / "given.wav"), sf.read(voice_wav)[0], 24000)
    script.write_text("\n".join(json.dumps(t) for t in [
        {"speaker": 0, "text": "hello", "audio": "given.wav"}, {"speaker": 1, "text": "Hi, how are you?"},
        {"speaker": 0, "text": "Fine, thanks."}]) + "\n")
    out = tmp_path / "talk.wav"
    assert main(["--script", str(script), "--out", str(out), "--checkpoint", checkpoint, *COMMON]) == 0
    turns = [sf.read(str(tmp_path / f"talk_{i:03d}.wav"))[0] for i in (1, 2, 3)]
    assert len(turns[0]) == audio.frames_for_samples(len(sf.read(voice_wav)[0])) * 1920
    assert all(0 < len(t) <= 3 * 1920 for t in turns[1:])
    joined = sf.read(str(out))[0]
    assert len(joined) == sum(len(t) for t in turns) - 2 * 720  # two 30 ms crossfades


def test_cli_batch_writes_one_wav_per_line_named_by_line_number(checkpoint, tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line here.\nThird.\n")
    assert main(["--batch-file", str(lines), "--out-dir", str(tmp_path / "out"), "--batch-size", "2",
                 "--checkpoint", checkpoint, "--trim-silence", *COMMON]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["001.wav", "003.wav", "004.wav"]
    assert "wrote 3 wavs" in capsys.readouterr().err


def test_cli_text_file_joins_the_utterances(checkpoint, tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text("One sentence here. Another one follows!\n\nAnd a last one?")
    assert main(["--text-file", str(story), "--out", str(tmp_path / "story.wav"), "--checkpoint", checkpoint,
                 *COMMON]) == 0
    assert "3 utterances" in capsys.readouterr().err and sf.info(str(tmp_path / "story.wav")).frames > 0


@pytest.mark.parametrize("argv, message", [
    (["--text", "x", "--text-file", "a.txt", "--out", "x.wav"], "give exactly one of"),
    (["--batch-file", "lines.txt"], "give the folder with --out-dir"),
    (["--script", "missing.jsonl", "--out", "x.wav"], "--script missing.jsonl does not exist"),
    (["--text", "x", "--out", "x.wav", "--end-bias", "-2"], "end bias must be >= 0"),
])
def test_cli_mode_mistakes_are_refused_with_the_fix(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_script_lines_name_the_line(checkpoint, tmp_path, capsys):
    script = tmp_path / "bad.jsonl"
    script.write_text('{"speaker": 0, "text": "ok"}\n{"speaker": 1}\n')
    assert main(["--script", str(script), "--out", str(tmp_path / "x.wav"), "--checkpoint", checkpoint,
                 *COMMON]) == 2
    assert 'line 2 needs a non-empty "text"' in capsys.readouterr().err


def test_best_of_n_returns_the_candidate_with_the_highest_mean_log_prob(generator):
    request = Request("Pick the best one.", 0)
    best, means = best_of_n(generator, request, 3, max_audio_length_ms=320, seed=5)
    candidates = generator.generate_codes([request] * 3, 320, seeds=[5, 6, 7])
    assert means.shape == (3,) and len({float(m) for m in means}) == 3
    index = int(np.argmax(means))
    np.testing.assert_array_equal(best, candidates[index])
    np.testing.assert_allclose(generator.score(request, best).mean(), means[index], rtol=1e-6)
