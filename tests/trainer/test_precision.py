"""trainer.train's mixed precision on a CPU: bf16 autocast with the plain attention path."""

import torch
from open_clip.loss import ClipLoss
from torch.profiler import ProfilerActivity, profile

from trainer.models import create_model
from trainer.train import autocast_for


def test_cpu_bf16_autocast_computes_the_fp32_loss_without_the_fused_attention_kernel():
    torch.manual_seed(0)
    model, _, _, tok = create_model("tiny")
    images = torch.randn(16, 3, 32, 32)
    texts = tok([f"a photo of a {c} star" for c in ("red", "blue", "green", "amber")] * 4)

    def loss_and_grads(precision):
        model.zero_grad(set_to_none=True)
        with autocast_for(precision, "cpu"):
            image_features, text_features, scale = model(images, texts)
            loss = ClipLoss()(image_features, text_features, scale)
        loss.backward()
        return loss.item(), image_features.dtype, model.visual.conv1.weight.grad.clone()

    fp32_loss, fp32_dtype, fp32_grad = loss_and_grads("fp32")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bf16_loss, bf16_dtype, bf16_grad = loss_and_grads("amp_bf16")
    ops = {e.key for e in prof.key_averages()}
    # torch's fused CPU attention kernel is ~10x slower in bf16 than the matmul path
    assert not any("flash_attention" in op for op in ops), sorted(ops)
    assert "aten::bmm" in ops and "aten::_softmax" in ops
    assert fp32_dtype == torch.float32 and bf16_dtype == torch.bfloat16
    assert abs(bf16_loss - fp32_loss) < 0.02 * fp32_loss, (bf16_loss, fp32_loss)
    cos = torch.nn.functional.cosine_similarity(bf16_grad.flatten(), fp32_grad.flatten(), dim=0)
    assert cos > 0.98, cos.item()
