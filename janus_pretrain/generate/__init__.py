"""AR (beam search) and NAR (mask-predict) decoding from one JANUS checkpoint."""
