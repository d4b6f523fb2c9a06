"""Serving trained models: the chat CLI (``posttrain chat``) and the generation engine behind ``posttrain serve``."""

from posttrain.serve.chat import ChatError, ChatSession, chat_name, format_columns, load_session, run_chat
from posttrain.serve.engine import Engine, GenerationRequest

__all__ = [
    "ChatError",
    "ChatSession",
    "Engine",
    "GenerationRequest",
    "chat_name",
    "format_columns",
    "load_session",
    "run_chat",
]
