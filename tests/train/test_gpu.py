"""CUDA: AMP and channels_last training, then export parity. Skipped where no GPU is visible."""

import pytest
import torch

from export import ExportConfig, VerificationError, export_checkpoint
from mcc_train.checkpoint import load_checkpoint
from mcc_train.cli import main


def export_and_prove(config: ExportConfig) -> bool:
    """Export; a failed proof fails the test with its table."""
    try:
        return export_checkpoint(config).passed
    except VerificationError as failed:
        pytest.fail(failed.report.table())


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_RUN = ["--arch", "resnet18", "--img-size", "32", "--workers", "2", "--no-progress"]  # and --device, data, --out


def test_amp_channels_last_training_and_export(tmp_path):
    data = ["--subset", "256", "--batch-size", "64", "--epochs", "2"]
    args = [*GPU_RUN, "--device", "cuda", *data, "--out", str(tmp_path / "run")]
    assert main(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())  # loadable anywhere
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert export_and_prove(ExportConfig(str(tmp_path / "run" / "last.pt"), str(tmp_path / "b"), latency_runs=5))


def fine_tune_args(tmp_path, device: str) -> list[str]:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), str(tmp_path / "w.safetensors"))
    data = ["--subset", "256", "--batch-size", "32", "--epochs", "2", "--freeze-backbone-epochs", "1"]
    extras = ["--head-lr-scale", "10", "--model-ema", "--grad-accum-steps", "2", "--balanced-sampler"]
    files = ["--out", str(tmp_path / "ft"), "--pretrained-file", str(tmp_path / "w.safetensors")]
    return [*GPU_RUN, "--device", device, *data, *extras, *files]


def test_fine_tuning_with_ema_and_accumulation_then_ema_export(tmp_path):
    """3-channel ImageNet-style weights on 1-channel digits, a frozen first epoch, EMA, accumulation, balanced
    draws, under AMP and channels_last; the EMA weights export and pass the proof."""
    assert main(fine_tune_args(tmp_path, "cuda")) == 0
    ckpt = load_checkpoint(tmp_path / "ft" / "last.pt")
    for weights in ("model", "model_ema"):
        assert all(v.device.type == "cpu" for v in ckpt[weights].values())
        assert all(torch.isfinite(v).all() for v in ckpt[weights].values() if v.is_floating_point())
    config = ExportConfig(str(tmp_path / "ft" / "last.pt"), str(tmp_path / "b"), latency_runs=5, weights="ema")
    assert export_and_prove(config)


@pytest.mark.parametrize("loss", ["arcface", "lsoftmax"])
def test_margin_heads_under_amp_export_with_their_proof(tmp_path, loss):
    """MC + a softmax variant under bf16/fp16 autocast and channels_last (the margin runs in float32), then the
    export's proof: the baseline cosine model for ArcFace, the vanilla linear one for L-Softmax."""
    data = ["--subset", "256", "--batch-size", "64", "--epochs", "2"]
    args = [*GPU_RUN, "--device", "cuda", *data, "--out", str(tmp_path / "run"), "--loss", loss]
    assert main(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert export_and_prove(ExportConfig(str(tmp_path / "run" / "last.pt"), str(tmp_path / "b"), latency_runs=5))


@pytest.mark.parametrize(
    "sampling, sigma_mode, loss", [("shared", "absolute", "softmax"), ("local", "relative", "softmax")]
)
def test_fused_head_equals_the_eager_head_on_cuda(sampling, sigma_mode, loss):
    """The compiled head (inductor's Triton kernels) against the eager one, with the same noise."""
    from .test_fused import _check_fused_equals_eager

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        _check_fused_equals_eager(sampling, sigma_mode, loss, device="cuda")
    torch._dynamo.reset()


def test_the_compiled_heads_in_kernel_noise_has_the_methods_statistics():
    from .test_fused import check_in_kernel_noise

    check_in_kernel_noise("cuda")


def test_the_loss_watch_lets_the_host_run_a_step_ahead():
    """push() returns while the step it was given is still running on the device, and waits for the step before."""
    from mcc_train.train import LossWatch

    watch = LossWatch(torch.device("cuda"), epoch=0)
    torch.cuda._sleep(2_000_000_000)  # a step that keeps the device busy for about a second
    assert watch.push(torch.ones((), device="cuda"), 0) is None
    assert not watch.pending[1].query()  # still running: push did not wait for it
    assert watch.push(torch.full((), 2.0, device="cuda"), 1) == 1.0  # waits for step 0 only
    assert watch.flush() == 2.0


def test_the_cuda_step_path_never_syncs(tmp_path):
    """torch's sync debug mode inside train_one_epoch: 4 steps or 12, the same synchronising calls (the epoch's
    end only). NOTE: it sees synchronous copies and stream syncs, not event waits; the test above covers those."""
    import warnings

    from mcc_train import train as train_module

    one_epoch = train_module.train_one_epoch

    def counted(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = one_epoch(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        return result

    counts = []
    train_module.train_one_epoch = counted
    try:
        for subset in (128, 384):
            data = ["--subset", str(subset), "--batch-size", "32", "--epochs", "1"]
            args = [*GPU_RUN, "--device", "cuda", *data, "--out", str(tmp_path / str(subset))]
            assert main(args) == 0
    finally:
        train_module.train_one_epoch = one_epoch
    assert counts[0] == counts[1] <= 2, counts
