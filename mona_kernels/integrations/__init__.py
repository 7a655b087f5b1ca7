from .convert import convert, is_mona

__all__ = ["convert", "is_mona"]
