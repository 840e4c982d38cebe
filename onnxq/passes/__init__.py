"""Graph passes before quantization: preparation, simplification, SmoothQuant, accuracy
recovery (equalization, bias correction, AdaRound)."""
