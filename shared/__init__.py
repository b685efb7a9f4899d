"""What both sides need: model loading and quantization, the LoRA delta type and its
wire codecs, the data format, the local training loop."""
