"""Errors as TF Serving answers them: a gRPC status code and one readable line."""

from __future__ import annotations

import re

import grpc

from .servables.session import SessionError


class ServingError(Exception):
    """An error with the gRPC status code TF Serving would answer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def clean_tf_message(message: str) -> str:
    """Turn a TF runtime error message into one readable line.

    Drops the "Graph execution error" preamble, node and function annotations and tensor names,
    and joins the bracketed pieces of an assertion ("[class_index out of range] [x = ] [7]").
    """
    lines = [
        line
        for line in message.splitlines()
        if line.strip()
        and line.strip() not in ("Graph execution error:", "<stack traces unavailable>")
        and not line.startswith("Detected at node")
        and not line.lstrip().startswith("[[{{")
    ]
    text = " ".join(lines)
    text = re.sub(r"\s*\[Op:[^\]]*\]", "", text)
    text = re.sub(r"\s*\[\[\{\{[^\]]*\]\]", "", text)
    text = re.sub(r" \([\w/.:-]+:\d+\)", "", text)  # tensor names: "x (class_index:0) ="
    prefix = "assertion failed: "
    if text.startswith(prefix + "["):  # (not again on a message cleaned before)
        pieces = _bracket_groups(text[len(prefix):])
        if pieces:
            out = pieces[0]
            for previous, piece in zip(pieces, pieces[1:]):
                if previous.endswith("="):  # a value: keep a vector recognisable
                    out += " " + (f"[{piece}]" if " " in piece else piece)
                else:
                    out += (" " if previous.endswith(":") else "; ") + piece
            text = prefix + out
    return re.sub(r"\s+", " ", text).strip()


def _bracket_groups(text: str) -> list[str]:
    """Top-level "[...]" groups of an Assert message, their contents stripped."""
    groups, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth == 0:
                start = i + 1
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0:
                groups.append(text[start:i].strip())
    return [g for g in groups if g]


def grpc_code(code: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a TF_Code number (TensorFlow's codes are gRPC's)."""
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)



def error_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, ServingError):
        return error.code
    if isinstance(error, SessionError):
        return grpc_code(error.code)
    return grpc.StatusCode.UNKNOWN
