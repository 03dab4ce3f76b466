from foundv2.nn.mrqvae import MultiViewRQVAE as MultiViewRQVAE
from foundv2.nn.mrqvae import disambiguate as disambiguate
from foundv2.nn.quantizer import QuantizerConfig as QuantizerConfig
from foundv2.nn.quantizer import ResidualGroupQuantizer as ResidualGroupQuantizer
