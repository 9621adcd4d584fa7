"""Inference: our decode loop (`engine`), sampling, the terminal chat (`chat`) and the OpenAI-compatible server
(`server`). `loading` finds and loads a model directory; `textstream` turns token ids into streamed text."""
