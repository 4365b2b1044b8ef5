"""``unimodal chat DIR``: a line-based terminal chat.

Text is streamed as it is generated. ``/image PATH`` and ``/audio PATH`` attach media to the next
message; generated images and audio are written under the output directory and their paths
printed. ``/reset`` starts over, ``/save [PATH]`` writes the conversation as a chat record
(``{"messages": [...]}`` with media as file paths: ``unimodal data pack`` reads it back), ``/quit``
leaves. When the conversation outgrows the context, the oldest turns are dropped and a line says
so.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, TextIO

from unimodal.inference.chat import Assistant, ChatError, ReplyPart
from unimodal.schema import write_whole

HELP = """commands:
  /image PATH    attach an image to your next message
  /audio PATH    attach an audio file to your next message
  /reset         forget the conversation
  /save [PATH]   write the conversation as a chat record (JSON)
  /help          this list
  /quit          leave (or Ctrl-D)
  //TEXT         send a message that starts with /TEXT"""

SUFFIX = {"image": "png", "audio": "wav"}
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Model output as the terminal shows it: control characters (an escape sequence could move
    the cursor, retitle the window or hide text) are written as ``\\xNN``."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Terminal:
    def __init__(self, assistant: Assistant, out_dir: str | Path, settings: dict[str, Any] | None = None,
                 system: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None):
        import sys

        self.assistant, self.out_dir = assistant, Path(out_dir)
        self.settings = dict(settings or {})
        self.resolved = assistant.resolve(**self.settings)  # bad settings fail now, not at the first message
        self.system = system
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.history: list[dict[str, Any]] = []
        self.attached: list[dict[str, Any]] = []
        self.replies = _last_reply_number(self.out_dir)  # numbering goes on: an earlier session's files stay

    def say(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def run(self) -> None:
        self.say(f"chatting with {self.assistant.name} (context {self.assistant.context_length} tokens); /help lists commands")
        self.reset(quiet=True)
        while True:
            self.say("you> ", end="")
            try:
                line = self.stdin.readline()
            except KeyboardInterrupt:  # the conversation stays: leaving takes /quit or Ctrl-D
                self.say("\n(/quit or Ctrl-D leaves; /save keeps the conversation)")
                continue
            if not line:
                self.say()
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if not self.command(line):
                        return
                except KeyboardInterrupt:  # a slow attachment or save: the conversation stays, as at the prompt
                    self.say(f"\n({line.split()[0]} cancelled; /quit or Ctrl-D leaves)")
                continue
            self.turn(line[1:] if line.startswith("//") else line)

    def command(self, line: str) -> bool:
        """Run a slash command; False when the chat should end."""
        verb, _, arg = line.partition(" ")
        arg = arg.strip()
        if verb in ("/quit", "/exit"):
            return False
        if verb in ("/image", "/audio"):
            kind = verb[1:]
            path = Path(arg).expanduser()
            if not arg:
                self.say(f"usage: {verb} PATH")
                return True
            if not path.exists():
                self.say(f"no such file: {arg!r} (usage: {verb} PATH)")
                return True
            try:  # read and encoded now, so that a bad file never costs the message typed next
                item = self.assistant.encode_media({"type": kind, kind: str(path)})
                # a clip longer than the codec takes, or media that leave the reply no room in the
                # context, are refused now too
                system = [{"role": "system", "content": self.system}] if self.system else []
                self.assistant.prompt([*system, {"role": "user", "content": [*self.attached, item]}], self.resolved)
            except ChatError as err:
                self.say(f"not attached: {re.sub(r'^message [0-9]+, part [0-9]+: ', '', str(err))}")
            else:
                # the history keeps what was encoded: the file may change or go while the chat goes
                # on, and no later turn encodes it again
                self.attached.append({**item, "path": str(path.resolve())})
                self.say(f"attached {kind} {path} to your next message")
        elif verb == "/reset":
            self.reset()
        elif verb == "/save":
            try:
                self.say(f"saved the conversation to {self.save(arg or None)}")
            except OSError as err:
                self.say(f"could not save the conversation: {err} (give another PATH)")
            except ValueError as err:
                self.say(f"could not save the conversation: {err}")
        elif verb == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {verb}\n{HELP}")
        return True

    def reset(self, quiet: bool = False) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.attached = []
        if not quiet:
            self.say("the conversation is reset")

    def turn(self, text: str) -> None:
        message = {"role": "user", "content": [{"type": "text", "text": text}] + self.attached}
        started = False  # "assistant> " comes with the reply's first text, so a refused message shows none
        after_media = False  # text after a "[... saved to ...]" line starts a line of its own
        saved: dict[int, str] = {}  # id(part) -> where the part was saved

        def show(piece: str = "") -> None:
            nonlocal started, after_media
            if not started:
                self.say("assistant> ", end="")
                started = True
            if piece and after_media:
                self.say()
                after_media = False
            self.say(printable(piece), end="")

        def keep(part: ReplyPart) -> None:
            """Each picture or clip saved and named where the reply has it."""
            nonlocal after_media
            show()
            if part.image is None and part.audio is None:
                return
            try:
                path = part.save(self.out_dir / f"reply{self.replies + 1:03d}-{len(saved)}.{SUFFIX[part.type]}")
            except (OSError, RuntimeError) as err:  # soundfile's errors are RuntimeErrors
                self.say(f"\n[the {part.type} could not be written under {self.out_dir}: {err}]", end="")
            else:
                saved[id(part)] = str(Path(path).resolve())
                self.say(f"\n[{part.type} saved to {path}]", end="")
            after_media = True

        def discard() -> None:
            """A reply that did not happen leaves none of its files (the next one takes their names)."""
            for path in saved.values():
                Path(path).unlink(missing_ok=True)

        try:
            reply = self.assistant.chat(self.history + [message], on_text=show, on_media=keep, **self.settings)
        except ChatError as err:
            discard()
            # the message is not sent, so its attachments go too: a bad file must not fail every later turn
            count = len(self.attached)
            dropped = f"; {count} attachment{'s' if count > 1 else ''} dropped" if count else ""
            self.attached = []
            self.say(f"{chr(10) if started else ''}(error: {err}{dropped})")
            return
        except KeyboardInterrupt:
            discard()
            self.say(f"{chr(10) if started else ''}(reply cancelled; your message was not added to the conversation)")
            return
        show()  # a reply of media alone
        self.attached = []
        self.replies += 1
        content = []
        for part in reply.parts:
            if part.type == "text":
                content.append(part.to_content())
                continue
            item = {"type": part.type, part.type: part.data}
            if id(part) in saved:
                item["path"] = saved[id(part)]
            content.append(item)
        self.say()
        if reply.finish_reason == "length":
            self.say(f"(the reply stopped at the length limit of {reply.completion_tokens} tokens)")
        if reply.trimmed:
            self.history = self.history[:1] + self.history[1 + reply.trimmed :] if self.system else self.history[reply.trimmed :]
            self.say(f"(the {reply.trimmed} oldest messages no longer fit in the context of "
                     f"{self.assistant.context_length} tokens and were dropped)")
        self.history += [message, {"role": "assistant", "content": content}]

    def save(self, path: str | None) -> Path:
        out = Path(path).expanduser() if path else _new_name(self.out_dir / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        messages = [{"role": m["role"], "content": _as_record(m["content"], out.parent.resolve())} for m in self.history]
        # one record on one line: `unimodal data pack` reads it (or a file of many) as JSONL; written
        # whole or not at all, so that a full disk never leaves half of an earlier save of this path
        write_whole(out, json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        return out


def _new_name(path: Path) -> Path:
    """``path``, or ``NAME-2.jsonl``, ``NAME-3.jsonl``... when it exists: a default name made in
    the same second as an earlier save (of a conversation since reset) must not overwrite it."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


def _last_reply_number(out_dir: Path) -> int:
    """The highest ``NNN`` of the ``replyNNN-K`` files already in ``out_dir`` (0 when none)."""
    if not out_dir.is_dir():
        return 0
    numbers = [int(m.group(1)) for f in out_dir.iterdir() if (m := re.fullmatch(r"reply(\d+)-\d+\.\w+", f.name))]
    return max(numbers, default=0)


def _as_record(content: Any, folder: Path) -> Any:
    """Message content as a chat record: media as file paths relative to the record's ``folder``,
    as ``unimodal data pack`` reads them (media without a file is left out)."""
    if isinstance(content, str):
        return content
    out = []
    for item in content:
        if item["type"] == "text":
            out.append({"type": "text", "text": item["text"]})
        elif "path" in item:
            path = os.path.relpath(item["path"], folder)
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:  # a file name of other bytes (read with surrogateescape)
                raise ValueError(f"the path {path!r} is not UTF-8, which a chat record (JSON) cannot hold") from None
            out.append({"type": item["type"], "path": path})
    return out
