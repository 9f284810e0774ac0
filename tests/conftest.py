"""Test environment: offline, no Ray telemetry, temp dirs under the work tree; tiny shared models."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", str(Path(__file__).resolve().parent.parent / ".work" / "ray"))
# where diffusers copies a folder's custom-pipeline code when it loads it (default: under the user's home)
os.environ.setdefault("HF_MODULES_CACHE", str(Path(__file__).resolve().parent.parent / ".work" / "hf_modules"))
torch.set_num_threads(min(2, torch.get_num_threads()))


REPO_RUNS = Path(__file__).resolve().parent.parent / "runs"


def _listing(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*")} if folder.is_dir() else set()


@pytest.fixture(autouse=True)
def nothing_written_to_the_checkouts_runs():
    """A test writes in its own temporary folder only: the checkout's runs/ (a user's searches) is left alone."""
    before = _listing(REPO_RUNS)
    yield
    assert _listing(REPO_RUNS) == before, f"the test wrote to {REPO_RUNS}: {sorted(_listing(REPO_RUNS) - before)[:5]}"


def random_flexidit(prediction: str = "flow", learn_sigma: bool = False, size: int = 8, extra: tuple = (4,),
                    lora_rank: int = 0, seed: int = 0):
    """A tiny FlexiDiT with all weights random (nothing zero-initialised), with weak sizes added."""
    from flexisearch.models.dit import FlexiDiT, FlexiDiTConfig

    torch.manual_seed(seed)
    m = FlexiDiT(FlexiDiTConfig(input_size=size, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                                learn_sigma=learn_sigma, prediction=prediction))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.with_patch_sizes(extra, init_std=0.05, lora_rank=lora_rank, lora_alpha=float(lora_rank)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: it saves a thread hand-off per op (seconds on a busy
    two-core machine); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    return random_flexidit()


def tiny_dit_pipeline():
    """DiT-XL-2-256's layout in miniature: learned sigma, 1000 classes (DiTPipeline's null id is 1000), 4-channel
    8x8 latents, a one-block VAE (8x8 images, no downsampling), DDIM with the DiT betas."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    shared = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:  # one embedder, as in every real DiT checkpoint
        block.norm1.emb.load_state_dict(shared)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    # DDIM has no learned variance: DiTPipeline drops the sigma channels, and so does the FlexiDiT pipeline.
    # facebook/DiT-XL-2-256's scheduler_config.json: DiT's linear betas, no clipping.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=False)
    pipe = DiTPipeline(transformer.eval(), vae.eval(), scheduler)
    pipe.register_to_config(id2label={"0": "tench, Tinca tinca", "1": "goldfish", "2": "white shark"})  # as on the Hub
    pipe.set_progress_bar_config(disable=True)
    return pipe
def converted_tiny_dit(root: Path):
    """tiny_dit_pipeline() saved as root/dit and converted by `flexisearch convert` (weak size 4) into root/flexi;
    returns the original pipeline."""
    from flexisearch.cli import main

    original = tiny_dit_pipeline()
    original.save_pretrained(root / "dit")
    assert main(["convert", str(root / "dit"), str(root / "flexi"), "--weak", "4"]) == 0
    return original


def spawn(cmd: list[str], folder: Path, **popen) -> subprocess.Popen:
    """A child process whose stdout and stderr go to files in folder (read back by `finish`), not to pipes: a
    child that writes more than a pipe holds while the test polls it would block until somebody reads."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("child-*.out")))
    with open(folder / f"child-{n}.out", "w") as out, open(folder / f"child-{n}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen)
    proc.logs = folder / f"child-{n}.out", folder / f"child-{n}.err"
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for a `spawn`ed child; its stdout and stderr."""
    proc.wait(timeout=timeout)
    return proc.logs[0].read_text(), proc.logs[1].read_text()


def flexify_on_ray(args: list[str], tmp_path: Path) -> None:
    """`flexisearch train flexify ARGS` on 2 Ray Train CPU workers, in a process of its own (Ray's files under
    tmp_path); checks that it succeeded with 2 workers (OUT given by --out, relative to the working directory)."""
    import json
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_TMPDIR=str(tmp_path / "r"))
    done = subprocess.run([sys.executable, "-m", "flexisearch.cli", "train", "flexify", *args, "--backend", "ray",
                           "--num-workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = Path(args[args.index("--out") + 1])
    assert json.loads((out / "train_info.json").read_text())["workers"] == 2


def tiny_rgb_featnet():
    """A random feature net for the 8x8 RGB images of tiny_dit_pipeline's VAE (3 classes, 8-d features)."""
    from flexisearch.metrics.featnet import DigitFeatureNet, FeatureNetConfig

    torch.manual_seed(0)
    return DigitFeatureNet(FeatureNetConfig(image_size=8, in_channels=3, num_classes=3, widths=(8, 8, 8, 8),
                                            feature_dim=8)).eval()




WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "fox", "cat", "dog", "in", "the", "snow", "grass", "sky"]


def tiny_tokenizer():
    """A word-level tokenizer over WORDS with T5's conventions (pad 0, eos 1 appended, unk 2), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pixart_pipeline():
    """PixArt-alpha's layout in miniature: a PixArtTransformer2DModel with learned sigma (no additional conditions,
    as PixArt-alpha 256/512), a 1-layer T5 encoder (12-d states) with tiny_tokenizer, the one-block VAE of
    tiny_dit_pipeline (8x8 images), and DPM-Solver++ with the DiT betas (PixArt-alpha's scheduler)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, cross_attention_dim=16, caption_channels=12,
                                           norm_num_groups=1, use_additional_conditions=False)
    with torch.no_grad():  # nothing zero-initialised
        for p in transformer.parameters():
            p.normal_(0, 0.05)
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=12, d_kv=6, d_ff=24, num_layers=1, num_heads=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                            beta_end=0.02, prediction_type="epsilon")
    pipe = PixArtAlphaPipeline(tokenizer=tiny_tokenizer(), text_encoder=encoder.eval(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def converted_tiny_pixart(root: Path):
    """tiny_pixart_pipeline() saved as root/pixart and converted by `flexisearch convert` (weak size 4) into
    root/flexi; returns the original pipeline."""
    from flexisearch.cli import main

    original = tiny_pixart_pipeline()
    original.save_pretrained(root / "pixart")
    assert main(["convert", str(root / "pixart"), str(root / "flexi"), "--weak", "4"]) == 0
    return original
