"""The same U-Net in PyTorch, for the speed comparison in ``tilepipe bench``.

PyTorch is an optional extra, imported only here and only when the comparison is asked
for. The module mirrors :class:`unet_flax.model.UNet` layer by layer and is filled from
a Flax model's parameters, so both compute the same function (checked by the bench as
class agreement), and like it computes the decoder only where logits on a ``core`` need it
(:func:`unet_flax.model.decoder_regions`): the same work in both. Eval mode: batch norm uses
its running statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unet_flax.model import Region, UNet, UNetConfig, decoder_regions, doubled, grow, within


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_torch_unet(config: UNetConfig) -> Any:
    """An uninitialised PyTorch U-Net of ``config`` (NCHW, channels-last memory format)."""
    import torch
    from torch import nn

    def conv_block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, eps=1e-5),
                             nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout, eps=1e-5), nn.ReLU(inplace=True))

    class TorchUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = config.widths
            self.down = nn.ModuleList([conv_block(config.in_bands if i == 0 else w[i - 1], w[i])
                                       for i in range(config.depth)])
            self.bottleneck = conv_block(w[-2], w[-1])
            self.upsample = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                                           for i in reversed(range(config.depth))])
            self.up = nn.ModuleList([conv_block(2 * w[i], w[i]) for i in reversed(range(config.depth))])
            self.head = nn.Conv2d(w[0], config.num_classes, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor, core: Region | None = None) -> torch.Tensor:
            """Logits on ``core`` (rows, columns; default: all of ``x``)."""
            outs, ins = decoder_regions(config.depth, tuple(x.shape[2:]), whole(x) if core is None else core)
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = cropped_block(self.bottleneck, x, whole(x), outs[-1])
            for upsample, block, skip, below, held, out in zip(self.upsample, self.up, reversed(skips),
                                                             reversed(outs[1:]), reversed(ins), reversed(outs[:-1])):
                up = crop(upsample(x), doubled(below), held)
                x = cropped_block(block, torch.cat([up, crop(skip, whole(skip), held)], dim=1), held, out)
            return self.head(x)

    def whole(x: torch.Tensor) -> Region:
        return (0, x.shape[2]), (0, x.shape[3])

    def crop(x: torch.Tensor, held: Region, region: Region) -> torch.Tensor:
        return x[:, :, *within(held, region)]

    def cropped_conv(conv: nn.Conv2d, x: torch.Tensor, held: Region, out: Region) -> torch.Tensor:
        """As the Flax pass does it: zero-padded on the window around ``out``, then cropped."""
        window = grow(out, 1, held)
        return crop(conv(crop(x, held, window)), window, out)

    def cropped_block(block: nn.Sequential, x: torch.Tensor, held: Region, out: Region) -> torch.Tensor:
        middle = grow(out, 1, held)
        x = block[2](block[1](cropped_conv(block[0], x, held, middle)))
        return block[5](block[4](cropped_conv(block[3], x, middle, out)))

    return TorchUNet()


def torch_unet_from_flax(model: UNet) -> Any:
    """A PyTorch twin of ``model`` with its weights, in eval mode and channels-last."""
    import torch

    net = build_torch_unet(model.config)

    def t(array: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def conv_weight(kernel: Any) -> torch.Tensor:  # HWIO -> OIHW
        return t(np.transpose(np.asarray(kernel), (3, 2, 0, 1)))

    def fill_block(block: Any, flax_block: Any) -> None:
        for conv_i, norm_i, conv, norm in ((0, 1, flax_block.conv1, flax_block.norm1),
                                           (3, 4, flax_block.conv2, flax_block.norm2)):
            block[conv_i].weight.data = conv_weight(conv.kernel[...])
            bn = block[norm_i]
            bn.eps = float(norm.epsilon)
            bn.weight.data, bn.bias.data = t(norm.scale[...]), t(norm.bias[...])
            bn.running_mean.data, bn.running_var.data = t(norm.mean[...]), t(norm.var[...])

    with torch.no_grad():
        for block, flax_block in zip(net.down, model.down):
            fill_block(block, flax_block)
        fill_block(net.bottleneck, model.bottleneck)
        for block, flax_block in zip(net.up, model.up):
            fill_block(block, flax_block)
        for up, flax_up in zip(net.upsample, model.upsample):
            # lax.conv_transpose puts x @ k[1-a, 1-b] at (2i+a, 2j+b); torch puts x @ w[:, :, a, b]:
            # flip both spatial axes, HWIO -> IOHW.
            kernel = np.asarray(flax_up.kernel[...])[::-1, ::-1]
            up.weight.data = t(np.transpose(kernel, (2, 3, 0, 1)))
            up.bias.data = t(flax_up.bias[...])
        net.head.weight.data = conv_weight(model.head.kernel[...])
        net.head.bias.data = t(model.head.bias[...])
    net.eval()
    return net.to(memory_format=torch.channels_last)


def torch_input(net: Any, x: np.ndarray) -> Any:
    """A (N, bands, H, W) float32 batch as ``net``'s input: on its device, in its dtype, channels-last."""
    import torch

    param = next(net.parameters())
    return torch.from_numpy(x).to(device=param.device, dtype=param.dtype).contiguous(memory_format=torch.channels_last)


def torch_classes(net: Any, x: Any, core: Region | None = None) -> Any:
    """Class indexes (N, H, W) of a :func:`torch_input` batch on ``core`` (default: all of it),
    on its device; inference mode. Waits for the device, so a timer around it measures the work."""
    import torch

    with torch.inference_mode():
        classes = net(x, core).argmax(dim=1)
    if classes.is_cuda:
        torch.cuda.synchronize(classes.device)
    return classes
