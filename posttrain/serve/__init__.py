"""Serving trained models: the chat CLI (``posttrain chat``)."""

from posttrain.serve.chat import ChatError, ChatSession, chat_name, format_columns, load_session, run_chat

__all__ = ["ChatError", "ChatSession", "chat_name", "format_columns", "load_session", "run_chat"]
