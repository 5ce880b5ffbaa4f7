"""Models: the DualEncoder interface, the registered backends, save and load."""

from medshield.models.base import DualEncoder, ZeroShotClassifier, check_images, check_texts
from medshield.models.chat import (
    ChatVLM,
    Conversation,
    Message,
    check_conversation,
    create_chat_model,
    load_image,
)
from medshield.models.io import create_model, load_model, save_model

__all__ = [
    "ChatVLM",
    "Conversation",
    "Message",
    "check_conversation",
    "create_chat_model",
    "load_image",
    "DualEncoder",
    "ZeroShotClassifier",
    "check_images",
    "check_texts",
    "create_model",
    "load_model",
    "save_model",
]
