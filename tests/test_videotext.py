"""Video-text pretraining: caption lists, tokenizers, the model and loss, retrieval metrics, one tiny run."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.captions import (
    DIRECTION_WORDS,
    HELD_OUT_TEMPLATES,
    ROTATION_WORDS,
    TRAIN_TEMPLATES,
    CaptionVideoDataset,
    caption,
    class_prompts,
    generate_videotext_dataset,
    read_caption_list,
)
from datasets.synthetic import CLASS_NAMES
from datasets.text_tokenizer import EOT, PAD, SOT, load_tokenizer, train_tokenizer
from models.videotext import contrastive_loss, videotext_loss, videotext_model
from tasks.videotext_eval import read_class_prompts, retrieval_metrics, zero_shot
from util.errors import DataFileError, MissingFileError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["A red square moves right, spinning clockwise", "A blue star slides to the left while turning counterclockwise",
          "Something goes up and spins clockwise", "A small green oval drifts downward, spinning counterclockwise"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- caption lists
def test_caption_list_groups_captions_per_video_and_reads_quoted_commas(tmp_path: Path) -> None:
    f = write(tmp_path / "c.csv", 'video,caption\na.mp4,"one, with a comma"\nb.mp4,two\na.mp4,three\n\n')
    cl = read_caption_list(str(f), "/data")
    assert cl.videos == ["/data/a.mp4", "/data/b.mp4"]
    assert cl.captions == [["one, with a comma", "three"], ["two"]]
    assert cl.all_captions() == ["one, with a comma", "three", "two"]


def test_caption_list_webvid_and_msrvtt_layouts(tmp_path: Path) -> None:
    webvid = write(tmp_path / "w.csv", "videoid,contentUrl,duration,page_dir,name\n"
                                       "1066,http://x,PT00H00M10S,003_001,Aerial view of a city\n")
    cl = read_caption_list(str(webvid), "/w", "videoid", "name", "{page_dir}/{}.mp4")
    assert cl.videos == ["/w/003_001/1066.mp4"] and cl.captions == [["Aerial view of a city"]]
    msrvtt = write(tmp_path / "m.csv", "key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl sings\n")
    # One setting for both files: the first column name of the comma list that the header has.
    cl = read_caption_list(str(msrvtt), "/m", "videoid,video_id", "name,sentence", "videos/{}.mp4")
    assert cl.videos == ["/m/videos/video7579.mp4"] and cl.captions == [["a girl sings"]]


@pytest.mark.parametrize("text, message", [
    ("clip,caption\na.mp4,x\n", "no video column 'video' in the header (clip, caption); name the right one with "
                                "--caption_video_column"),
    ("video,text\na.mp4,x\n", "no caption column 'caption' in the header (video, text)"),
    ("video,caption\na.mp4,x\nb.mp4,  \n", "c.csv:3: empty caption in column 'caption' for video 'b.mp4'; fill it "
                                          "in or delete the row"),
    ("video,caption\n,a caption\n", "c.csv:2: empty video in column 'video'"),
    ("video,caption\na.mp4,one,two\n", "c.csv:2: more fields than the header has columns (2); quote captions"),
    ("", "empty file"),
    ("video,caption\n", "has a header but no rows"),
])
def test_caption_list_errors_name_the_problem_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        read_caption_list(str(write(tmp_path / "c.csv", text)))
    assert message in str(exc.value)


def test_caption_list_path_format_naming_an_unknown_column(tmp_path: Path) -> None:
    f = write(tmp_path / "c.csv", "video,caption\na,x\n")
    with pytest.raises(ValueError, match=r"c.csv:2: --caption_path_format '\{dir\}/\{\}.mp4' names 'dir'"):
        read_caption_list(str(f), path_format="{dir}/{}.mp4")


# ----------------------------------------------------------------------------- tokenizers
def test_caption_list_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_bytes(b"video,caption\na.mp4,fine\nb.mp4,caf\xe9 latin-1\n")
    with pytest.raises(DataFileError, match=r"c\.csv:3: not UTF-8 text.*iconv"):
        read_caption_list(str(f))


@pytest.mark.parametrize("row", ['b.mp4,' + "x" * (128 * 1024 + 1), 'b.mp4,"an unclosed quote\n' + "y" * 140_000])
def test_caption_list_field_over_csv_limit_names_file_and_line(tmp_path: Path, row: str) -> None:
    """A caption over csv's 128 KiB limit (or an unclosed quote eating the file): file, line and the likely cause."""
    f = write(tmp_path / "c.csv", "video,caption\na.mp4,fine\n" + row + "\n")
    with pytest.raises(DataFileError, match=r"c\.csv:3: .*field larger.*unclosed quote"):
        read_caption_list(str(f))


def test_caption_list_fifo_or_folder_is_said_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.csv")  # opened, it would block: the check only stats it
    with pytest.raises(MissingFileError, match=r"fifo\.csv is a FIFO"):
        read_caption_list(str(tmp_path / "fifo.csv"))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_caption_list(str(tmp_path))


def test_caption_list_with_a_byte_order_mark_keeps_its_first_column(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_bytes(b"\xef\xbb\xbfvideo,caption\na.mp4,a caption\n")
    assert read_caption_list(str(f)).videos == ["a.mp4"]


@pytest.mark.parametrize("content, message", [
    (b"{not json", r"t\.json:1: not a tokenizer file \(not JSON"),
    (b"{\n\n  \"model\": [1,\n}", r"t\.json:4: not a tokenizer file \(not JSON"),
    (b"[1, 2, 3]", r"t\.json: not a tokenizer file \(it holds a JSON list"),
    (b"\"text\"", r"t\.json: not a tokenizer file \(it holds a JSON str"),
    (b"\x00\x01\xff\xfe binary", r"t\.json:1: not a tokenizer file \(bytes that are not UTF-8"),
    (b'{"model": {"type": "BPE", "vocab": 7}}', r"t\.json: not a tokenizer Hugging Face can read"),
    (b'{"version": "1.0"}', r"t\.json is neither a Hugging Face tokenizer\.json"),
    pytest.param(b'{"model": ' + b"[" * 100_000, r"t\.json: not a tokenizer file \(JSON nested too deeply",
                 id="nested-100000"),
])
def test_hostile_tokenizer_file_names_the_file_and_the_fix(tmp_path: Path, content: bytes, message: str) -> None:
    """What resume reads as OUT/tokenizer.json: damage is a DataFileError naming the file, never a raw error later."""
    (tmp_path / "t.json").write_bytes(content)
    with pytest.raises(DataFileError, match=message) as err:
        load_tokenizer(tmp_path / "t.json")
    assert "put back this run's own tokenizer.json" in str(err.value)


def test_bpe_tokenizer_round_trip_fixed_length_and_save(tmp_path: Path) -> None:
    tok = train_tokenizer(CORPUS * 5, "bpe", vocab_size=300)
    ids = tok.encode(CORPUS, context_length=20)
    assert ids.shape == (4, 20) and ids.dtype == np.int64
    for row, text in zip(ids, CORPUS, strict=True):
        n = int((row != PAD).sum())
        assert row[0] == SOT and row[n - 1] == EOT and (row[n:] == PAD).all()
        assert tok.decode(row) == text.lower()  # the normaliser lower-cases
    # A caption longer than the context is cut and still ends in [EOT] (the text tower pools there).
    cut = tok.encode([CORPUS[1]], context_length=5)[0]
    assert cut[0] == SOT and cut[-1] == EOT and len(cut) == 5
    path = tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(path)
    assert again.vocab_size == tok.vocab_size and (again.encode(CORPUS, 20) == ids).all()
    assert (pickle.loads(pickle.dumps(tok)).encode(CORPUS, 20) == ids).all()  # what the data workers get


def test_byte_tokenizer_round_trip_and_text_masking(tmp_path: Path) -> None:
    tok = train_tokenizer([], "byte")
    row = tok.encode(["Caf\u00e9 au lait"], 32)[0]
    assert tok.decode(row) == "Caf\u00e9 au lait" and tok.vocab_size == 260
    assert load_tokenizer(tok.save(tmp_path / "t.json")).kind == "byte"
    # Text masking drops round(0.5 * 12) of 12 content ids, keeps the order and the [SOT]/[EOT] frame.
    masked = tok.encode(["abcdefghijkl"], 32, drop_ratio=0.5, rng=np.random.default_rng(0))[0]
    kept = tok.decode(masked)
    assert masked[0] == SOT and masked[7] == EOT and len(kept) == 6
    assert kept == "".join(sorted(kept)) and set(kept) <= set("abcdefghijkl")


# ----------------------------------------------------------------------------- model and loss
def tiny(**kw):
    torch.manual_seed(0)
    return videotext_model("mae_vit_micro_patch8", 40, context_length=8, text_width=32, text_depth=1, text_heads=2,
                           embed_dim=16, img_size=32, num_frames=4, t_patch_size=2, depth=2, pred_t_dim=2,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)


def ids(n: int) -> torch.Tensor:
    x = torch.randint(4, 40, (n, 8))
    x[:, 0], x[:, 5], x[:, 6:] = SOT, EOT, PAD
    return x


def test_contrastive_loss_is_symmetric_infonce_over_the_batch() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor([10.0])
    loss, metrics = contrastive_loss(v, t, scale)
    logits = 10.0 * v @ t.T
    expected = -(logits.diag() - logits.logsumexp(1)).mean() / 2 - (logits.diag() - logits.logsumexp(0)).mean() / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    assert metrics["temperature"] == pytest.approx(0.1)
    # Aligned pairs give a lower loss than shuffled ones.
    assert contrastive_loss(v, v, scale)[0] < contrastive_loss(v, v.roll(1, 0), scale)[0]


def test_flip_model_has_no_decoder_and_every_parameter_learns() -> None:
    model = tiny()
    assert not any(n.startswith("video.decoder") or n == "video.mask_token" for n, _ in model.named_parameters())
    out = model(torch.randn(4, 3, 4, 32, 32), ids(4), 0.5, torch.rand(4, 32))
    assert out["video"].shape == (4, 16) and torch.allclose(out["video"].norm(dim=-1), torch.ones(4))
    videotext_loss(out)[0].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP needs every one used
    assert len(model.shard_units()) == 2 + 1  # video blocks + text blocks
    text_only = model(torch.zeros(0, 3, 4, 32, 32), ids(3), 0.0)
    assert set(text_only) == {"logit_scale", "text"}


def test_smaug_one_encoder_pass_feeds_the_decoder_and_sparsification_keeps_attended_tokens() -> None:
    model = tiny(mae_decoder=True, sparsify_keep=0.5, sparsify_layer=1)
    clips, noise = torch.randn(2, 3, 4, 32, 32), torch.rand(2, 32)
    latent, dec_latent, mask, ids_restore = model._encode_video(clips, 0.5, noise)
    # 16 visible tokens -> 8 kept + 1 fused after block 1; the decoder gets the class token + the kept 8.
    assert latent.shape[1] == 1 + 8 + 1 and dec_latent.shape[1] == 1 + 8
    order = ids_restore.argsort(dim=1)[:, :8]  # the decoder places the kept tokens at these positions
    assert (mask.gather(1, order) == 0).all()  # every kept token is a visible one
    attn = model._attn  # the ranking block left the class token's attention (popped once used)
    assert "cls_attn" not in attn
    out = model(clips, ids(2), 0.5, noise)
    loss, metrics = videotext_loss(out, mae_loss_weight=0.5)
    assert "mae_loss" in metrics and loss > metrics["contrastive"]
    loss.backward()
    assert all(p.grad is not None for p in model.video.decoder_blocks.parameters())
    assert len(model.shard_units()) == 2 + 1 + 1


def test_sparsification_ranks_by_the_class_tokens_attention() -> None:
    model = tiny(sparsify_keep=0.25, sparsify_layer=1)
    x = torch.randn(1, 1 + 8, 128)
    attn = torch.tensor([[0.3, 0.01, 0.2, 0.02, 0.3, 0.03, 0.04, 0.05, 0.05]])
    model._attn["cls_attn"] = attn
    ids_keep = torch.tensor([[10, 3, 7, 1, 30, 2, 4, 5]])
    kept_x, kept_ids = model._sparsify(x, ids_keep)
    # The two most attended visible tokens are entries 3 (0.3) and 1 (0.2), token ids 1 and 3: kept in token order.
    assert kept_ids.tolist() == [[1, 3]]
    assert torch.equal(kept_x[:, 0], x[:, 0]) and torch.equal(kept_x[:, 1], x[:, 4]) and torch.equal(kept_x[:, 2], x[:, 2])
    w = attn[0, 1:].clone()
    w[[1, 3]] = 0
    assert torch.allclose(kept_x[0, 3], (x[0, 1:] * w[:, None]).sum(0) / w.sum(), atol=1e-6)


def test_flops_are_counted_from_the_configuration() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = tiny()
        clips, tokens, noise = torch.randn(2, 3, 4, 32, 32), torch.zeros(2, 8, dtype=torch.long), torch.rand(2, 32)
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(clips, tokens, 0.5, noise)
    # The counter sees the same matmuls (causal attention counted in full by both).
    assert model.flops_per_clip(0.5)["forward"] == counter.get_total_flops() // clips.shape[0]  # per clip


# ----------------------------------------------------------------------------- evaluation
def test_retrieval_metrics_on_a_hand_made_similarity_matrix() -> None:
    # 4 captions x 3 videos; captions 0 and 3 belong to video 0, caption 1 to video 1, caption 2 to video 2.
    sim = torch.tensor([[0.9, 0.1, 0.2],    # its video ranks 1
                        [0.8, 0.3, 0.1],    # its video (1) ranks 2
                        [0.5, 0.6, 0.1],    # its video (2) ranks 3
                        [0.1, 0.2, 0.3]])   # its video (0) ranks 3
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2, 0]))
    assert m["t2v_R@1"] == 25.0 and m["t2v_R@5"] == 100.0
    assert m["t2v_MdR"] == 2.0 and m["t2v_MnR"] == pytest.approx(9 / 4)  # ranks 1, 2, 3, 3 (median: lower middle)
    # v2t, per video over captions: video 0 -> caption 0 ranks 1 (0.9 highest); video 1 -> caption 1 has 0.3,
    # beaten by caption 2's 0.6 -> rank 2; video 2 -> caption 2 has 0.1, beaten by 0.2 and 0.3 and tied by 0.1 -> 4.
    assert m["v2t_R@1"] == pytest.approx(100 / 3) and m["v2t_MnR"] == pytest.approx(7 / 3)
    assert m["texts"] == 4 and m["videos"] == 3
    constant = retrieval_metrics(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    assert constant["t2v_R@1"] == 0.0  # ties count against the query: a constant model never looks good


def test_zero_shot_from_prompt_ensembles() -> None:
    videos = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.3]]), dim=-1)
    prompts = [torch.tensor([[1.0, 0.0], [0.8, 0.2]]), torch.tensor([[0.0, 1.0]])]
    metrics, pred = zero_shot(videos, prompts, torch.tensor([0, 1, 1]))
    assert pred.tolist() == [0, 1, 0] and metrics["top1"] == pytest.approx(200 / 3)
    assert metrics["mean_class_top1"] == pytest.approx(75.0)


def test_class_prompts_file_errors(tmp_path: Path) -> None:
    f = write(tmp_path / "p.json", json.dumps({"a": ["x"], "b": []}))
    with pytest.raises(ValueError, match="class 'b' needs a non-empty list"):
        read_class_prompts(f, ["a", "b"])
    with pytest.raises(ValueError, match=r"no prompts for classes \['c'\]"):
        read_class_prompts(write(tmp_path / "q.json", json.dumps({"a": "x"})), ["a", "c"])


# ----------------------------------------------------------------------------- generated data and a tiny run
def template_pattern(template: str) -> re.Pattern:
    """A regex matching the captions a template can produce (any subject, direction, rotation, speed)."""
    body = re.escape(template)
    for field in ("subject", "speed", "direction", "rotation"):
        body = body.replace(re.escape("{" + field + "}"), ".*")
    for field, words in (("s", "s?"), ("es", "(?:es)?"), ("it", "(?:it|they)")):
        body = body.replace(re.escape("{" + field + "}"), words)
    return re.compile("^" + body + "$", re.IGNORECASE)


def test_caption_verbs_agree_with_one_or_two_objects() -> None:
    star = dict(shape="star", colour=np.array([1.0, 0.0, 0.0]), r=8.0, speed=1.0)
    cross = dict(star, shape="cross", colour=np.array([0.0, 0.0, 1.0]))
    right_cw = CLASS_NAMES.index("right-cw")
    for template, one, two in ((TRAIN_TEMPLATES[4], "goes", "go"), (HELD_OUT_TEMPLATES[2], "it spins", "they spin"),
                               (TRAIN_TEMPLATES[0], "moves", "move")):
        single = caption(right_cw, [star], template, np.random.default_rng(0), 32, detail=1)
        double = caption(right_cw, [star, cross], template, np.random.default_rng(0), 32, detail=2)
        generic = caption(right_cw, [star, cross], template, np.random.default_rng(0), 32, detail=0)
        assert f" {one} " in single and f" {two} " in double and " and a blue cross " in double, (single, double)
        assert f" {one} " in generic, generic  # "something", "a shape": one subject whatever is drawn


def test_generated_captions_state_the_motion_and_hold_out_phrasings(tmp_path: Path) -> None:
    out = generate_videotext_dataset(str(tmp_path / "vt"), num_videos=16, size=32, frames=20)
    train = read_caption_list(os.path.join(out, "train_captions.csv"), out)
    test = read_caption_list(os.path.join(out, "test_captions.csv"), out)
    labels = {}
    for split in ("train", "val", "test"):
        labels.update({os.path.join(out, p): int(lab) for p, lab in (row.split() for row in
                                                                     open(os.path.join(out, f"{split}.csv")))})
    train_patterns = [template_pattern(t) for t in TRAIN_TEMPLATES]
    held_patterns = [template_pattern(t) for t in HELD_OUT_TEMPLATES]
    for captions, own, other, per_video in ((train, train_patterns, held_patterns, 5),
                                            (test, held_patterns, train_patterns, 1)):
        for video, caps in zip(captions.videos, captions.captions, strict=True):
            direction, sense = CLASS_NAMES[labels[video]].split("-")
            assert len(caps) == per_video
            for c in caps:
                words = c.lower().replace(",", "").split()
                assert ROTATION_WORDS[sense] in words and ROTATION_WORDS["cw" if sense == "ccw" else "ccw"] not in words
                assert any(d in c.lower() for d in DIRECTION_WORDS[direction])
                assert any(p.match(c) for p in own) and not any(p.match(c) for p in other), c
    prompts = class_prompts()
    assert list(prompts) == CLASS_NAMES and all(len(p) == 27 for p in prompts.values())
    assert all(any(p.match(c) for p in held_patterns) for ps in prompts.values() for c in ps)
    ds = CaptionVideoDataset(train, train_tokenizer(train.all_captions()), 24, mode="pretrain", num_frames=4,
                             sampling_rate=4, crop_size=32, seed=3, mask_noise_tokens=32, short_side_range=None)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert a["tokens"].shape == (1, 24) and torch.equal(a["tokens"], b["tokens"])  # per-sample randomness
    assert a["noise"].shape == (1, 32) and torch.equal(a["clips"], b["clips"])


def run_main(*args: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """main_pretrain.py with these flags, generated data cached under `cache`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MAE_ST_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ROOT / "main_pretrain.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY_RUN = ["--config", str(ROOT / "configs/pretrain/videotext_demo.yaml"), "--synthetic_videos", "24",
            "--epochs", "2", "--batch_size", "4", "--num_workers", "0", "--log_every", "1", "--text_depth", "1",
            "--context_length", "24", "--save_every", "3", "--eval_temporal_views", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny demo run (8 steps on 24 generated videos, end-of-run evaluation): its folder and data cache."""
    tmp = tmp_path_factory.mktemp("videotext_tiny")
    out, cache = tmp / "vt", tmp / "cache"
    proc = run_main(*TINY_RUN, "--output_dir", str(out), cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, cache


def test_video_text_runs_apply_the_decode_bounds(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """--max_video_frames reaches the caption datasets: every generated video is over a bound of 2 frames."""
    _, cache = tiny_run
    proc = run_main(*TINY_RUN, "--output_dir", str(tmp_path / "vt"), "--max_video_frames", "2", "--max_steps", "1",
                    cache=cache)
    assert proc.returncode != 0
    assert "frames exceed --max_video_frames 2" in proc.stderr and "videos in a row failed" in proc.stderr


def test_tiny_run_writes_checkpoints_tokenizer_and_evaluations(tiny_run: tuple[Path, Path]) -> None:
    out, _ = tiny_run
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 8 and {"contrastive", "temperature", "t2v_acc", "mfu"} <= steps[0].keys()
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert any("retrieval/t2v_R@1" in r for r in logged) and any("zeroshot/top1" in r for r in logged)
    assert (out / "checkpoints" / "latest").resolve().name == "step-8"
    assert load_tokenizer(out / "tokenizer.json").kind == "bpe" and any((out / "tensorboard").iterdir())
    first = json.loads((out / "eval_retrieval.json").read_text())
    assert first["texts"] == first["videos"] == 3 and 0 <= first["t2v_R@1"] <= 100
    assert json.loads((out / "eval_zeroshot.json").read_text())["classes"] == 8
    assert (out / "retrieval_examples.png").stat().st_size > 0 and (out / "confusion_zeroshot.png").is_file()


@pytest.mark.slow
def test_tiny_run_eval_commands_repeat_its_numbers_and_refuse_an_untrained_folder(tmp_path: Path,
                                                                                  tiny_run: tuple[Path, Path]) -> None:
    """The README's evaluation commands on the finished run give the numbers of its end-of-run evaluation."""
    import shutil

    src, cache = tiny_run
    out = tmp_path / "vt"
    shutil.copytree(src, out, symlinks=True)  # the fixture's folder stays as the other test saw it
    first = json.loads((out / "eval_retrieval.json").read_text())
    (out / "eval_retrieval.json").unlink()
    again = run_main(*TINY_RUN, "--output_dir", str(out), "--videotext_eval", "retrieval", cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "eval_retrieval.json").read_text())["t2v_R@1"] == first["t2v_R@1"]
    bad = run_main(*TINY_RUN, "--output_dir", str(tmp_path / "empty"), "--videotext_eval", "zeroshot", cache=cache)
    assert bad.returncode != 0 and "--videotext_eval tests a trained run" in bad.stderr


@pytest.mark.parametrize("flags, message", [
    (["--repeat_aug", "2"], "set --repeat_aug 1"),
    (["--mask_type", "amt"], "--mask_type random, tube, frame or cube (got amt"),
    (["--mask_type", "adaptive"], "--mask_type random, tube, frame or cube (got adaptive"),
])
def test_objective_videotext_refuses_repeated_clips_and_learned_masks(flags: list[str], message: str) -> None:
    """Refused when the flags are read, before any data is generated or model built."""
    import main_pretrain
    from util.config import ConfigError, parse_args

    args = parse_args(main_pretrain.get_args_parser(TINY_RUN), [*TINY_RUN, *flags])
    with pytest.raises(ConfigError, match=re.escape(message)):
        main_pretrain.build_task(args)


@pytest.mark.parametrize("recipe", ["videotext_demo", "videotext_vit_b_webvid", "videotext_vit_b_webvid_unmasked"])
def test_videotext_recipes_parse_and_follow_flip(recipe: str, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    """Every key is a flag; the WebVid recipes state their layout and keep FLIP's settings; submitit takes them."""
    import re

    import main_pretrain
    from launchers import submitit_pretrain
    from util.config import parse_args

    path = ROOT / "configs" / "pretrain" / f"{recipe}.yaml"
    args = parse_args(main_pretrain.get_args_parser(["--config", str(path)]), ["--config", str(path)])
    task = main_pretrain.build_task(args)
    from tasks.videotext import VideoTextTask

    assert isinstance(task, VideoTextTask) and args.repeat_aug == 1 and not args.videotext_hflip
    if recipe == "videotext_demo":
        return
    layout = re.search(r"layout: (\d+) nodes x (\d+) GPUs", path.read_text())
    assert layout and int(layout.group(1)) * int(layout.group(2)) == 64
    assert args.batch_size * args.accum_iter * 64 == 4096
    assert (args.mask_ratio, args.mask_type, args.weight_decay, args.opt_betas, args.clip_grad) == \
        (0.5, "random", 0.2, [0.9, 0.95], 0.0)
    assert (args.text_width, args.text_depth, args.text_heads, args.context_length, args.embed_dim) == (512, 12, 8, 32, 512)
    assert (args.text_causal, args.text_pool, args.video_pool, args.temperature) == (False, "first", "mean", 0.07)
    unmasked = recipe.endswith("unmasked")
    assert args.blr == (4e-8 if unmasked else 4e-6) and (args.unmasked_epochs >= args.epochs) == unmasked
    job = submitit_pretrain.main(["--dry_run", "--nodes", "8", "--ngpus", "8", "--config", str(path),
                                  "--data_path", "/data/webvid", "--job_dir", str(tmp_path / "j")])
    assert job is None and "#SBATCH --nodes=8" in capsys.readouterr().out
