"""`minillm chat` (talk to a model in the terminal) and `minillm serve` (an OpenAI-compatible HTTP server)."""

from __future__ import annotations

from pathlib import Path

import typer

ENGINE_HELP = "Decode loop: 'minillm' (ours, cached, fast) or 'hf' (transformers' generate())."
MODEL_HELP = (
    "Model directory, run directory (its final/) or checkpoint of a run (runs/NAME/checkpoints/step_N). Default: "
    "the newest finished run, SFT before pretrain."
)
DEVICE_HELP = "auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps."
MAX_SEED = 2**63 - 1024  # minillm.inference.sampling.MAX_SEED (not imported here: it pulls in torch)


def register(app: typer.Typer) -> None:
    """Add `chat` and `serve` to the app."""

    @app.command()
    def chat(
        model: Path = typer.Option(None, "--model", help=MODEL_HELP),
        prompt: str = typer.Option(None, "--prompt", help="Answer this one message on stdout and exit."),
        system: str = typer.Option(None, "--system", help="System prompt."),
        temperature: float = typer.Option(
            0.7, "--temperature", min=0.0,
            help="0 = greedy: the likeliest token after --repetition-penalty (1 for transformers' plain greedy).",
        ),
        top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0),
        top_k: int = typer.Option(0, "--top-k", min=0, help="0 = off."),
        repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", min=0.01, help="1 = off."),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
        seed: int = typer.Option(
            None, "--seed", min=0, max=MAX_SEED, help="Seed for sampling (turn i uses seed + i)."
        ),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        engine: str = typer.Option("minillm", "--engine", help=ENGINE_HELP),
    ) -> None:
        """Chat with a model in the terminal (streaming; /reset, /system TEXT, /exit)."""
        from rich.console import Console

        from minillm.errors import UserError
        from minillm.inference.chat import ChatSession, answer_once, run_repl
        from minillm.inference.engine import make_engine
        from minillm.inference.loading import load_model_and_tokenizer, model_display_name
        from minillm.inference.sampling import SamplingParams

        if engine not in ("minillm", "hf"):
            raise UserError(f"--engine {engine}: choose 'minillm' or 'hf'")
        if top_p == 0:
            raise UserError("--top-p 0 keeps no token; use a value in (0, 1]")
        loaded, tokenizer, model_dir = load_model_and_tokenizer(model, device)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        session = ChatSession(make_engine(engine, loaded, tokenizer), params)
        try:
            session.set_system(system)
        except ValueError as err:
            raise UserError(f"--system: {err}") from None
        console = Console(highlight=False)
        if prompt is not None:
            try:
                answer_once(session, prompt, console)
            except ValueError as err:
                raise UserError(f"--prompt: {err}") from None
            return
        run_repl(session, console, model_display_name(model_dir))

    @app.command()
    def serve(
        model: Path = typer.Option(None, "--model", help=MODEL_HELP),
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."
        ),
        port: int = typer.Option(8000, "--port", min=1, max=65535),
        api_key: str = typer.Option(
            None, "--api-key", envvar="MINILLM_API_KEY", help="Require 'Authorization: Bearer KEY'."
        ),
        max_concurrency: int = typer.Option(
            32,
            "--max-concurrency",
            min=1,
            help="Requests admitted at once (decoding or queued); more get 429.",
        ),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        engine: str = typer.Option("minillm", "--engine", help=ENGINE_HELP),
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
        from minillm.errors import UserError
        from minillm.inference.server import serve as run_server

        if engine not in ("minillm", "hf"):
            raise UserError(f"--engine {engine}: choose 'minillm' or 'hf'")
        run_server(model, host, port, api_key, max_concurrency, device, engine)
