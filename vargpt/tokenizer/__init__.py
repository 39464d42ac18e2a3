"""Images <-> multi-scale code maps: the VAR multi-scale residual VQ-VAE (SPEC section 1).

``scales`` (pure schedule helpers), ``quantizer`` (:class:`MultiScaleQuantizer`), ``autoencoder``
(convolutional encoder/decoder) and ``vqvae`` (:class:`MultiScaleVQVAE`, the public entry point).
"""

from vargpt.tokenizer.quantizer import MultiScaleQuantizer
from vargpt.tokenizer.vqvae import MultiScaleVQVAE

__all__ = ["MultiScaleQuantizer", "MultiScaleVQVAE"]
