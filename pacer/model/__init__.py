"""The real model and the tensors: the Llama architecture, paged attention and its CPU kernels, quantized weights,
sampling, checkpoint and tokenizer loading, and ModelRunner, the Executor that runs a plan on them."""
