"""``feedback``: an instructor releases a notebook's feedback (POST); a student fetches theirs (GET)."""

from __future__ import annotations

import base64
import json
import logging

from tornado import web
from tornado.iostream import StreamClosedError

from nbexchange.api.uploads import UploadHandler
from nbexchange.exchange import FeedbackFile
from nbexchange.storage import CHUNK_SIZE

log = logging.getLogger(__name__)

#: Bytes of a file encoded at a time: a multiple of 3, so that no piece's base64 is padded
#: and the pieces concatenate into the base64 of the whole file.
BASE64_CHUNK = CHUNK_SIZE - CHUNK_SIZE % 3


@web.stream_request_body
class FeedbackHandler(UploadHandler):
    route_name = "feedback"
    file_field = "feedback"
    gzip_required = False
    limit_setting = "max_feedback_size"

    async def get(self) -> None:
        """The caller's own feedback on the assignment; appends ``feedback_fetched`` if there was any."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.exchange.member(self.user, course_id)
        position = await self.read_position()
        files, event = await self.run(
            self.exchange.fetch_feedback, self.user, course_id, assignment_id, self.idempotency_key()
        )
        try:
            await self._send(files, event.position if event else position)
        except StreamClosedError:
            # The client went away mid-answer: there is no one to answer, and nothing failed here.
            log.info("GET feedback: the client closed the connection before the answer was complete")
        finally:
            for feedback in files:
                feedback.file.close()

    async def _send(self, files: list[FeedbackFile], position: int) -> None:
        """``{"success", "position", "feedback": [{filename, timestamp, checksum, content}…]}``, written in pieces.

        Each file's base64 is encoded a chunk at a time (read in a thread) and flushed
        before the next, so ten parallel fetches of a 50 MB feedback hold ten chunks,
        not ten copies of the file and its encoding.
        """
        opening = json.dumps({"success": True, "position": position})[:-1] + ', "feedback": ['
        heads = [
            json.dumps({"filename": f.filename, "timestamp": f.timestamp, "checksum": f.checksum})[:-1]
            + ', "content": "'
            for f in files
        ]
        # json.dumps writes ASCII only, so characters are bytes; base64 is 4 bytes per 3, padded.
        length = len(opening) + sum(len(h) + 4 * ((f.size + 2) // 3) + 2 for h, f in zip(heads, files, strict=True))
        length += 2 * max(len(files) - 1, 0) + 2
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Content-Length", str(length))
        self.write(opening)
        for index, (head, feedback) in enumerate(zip(heads, files, strict=True)):
            self.write((", " if index else "") + head)
            while chunk := await self.run(feedback.file.read, BASE64_CHUNK):
                self.write(base64.b64encode(chunk))
                await self.flush()
            self.write('"}')
        self.finish("]}")

    async def authorize_upload(self) -> None:
        """An Instructor of the course; the student's submission at ``timestamp`` exists in the log."""
        self.course_id, self.assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.notebook_id, self.student_id = self.id_param("notebook"), self.id_param("student")
        self.timestamp = self.timestamp_param()
        self.checksum = self.id_param("checksum")
        self.key = self.idempotency_key()
        self.decided = await self.run(
            self.exchange.may_release_feedback,
            self.user,
            self.course_id,
            self.assignment_id,
            self.student_id,
            self.timestamp,
        )

    async def post(self) -> None:
        """Release feedback on one notebook of the submission made at ``timestamp``."""
        written = await self.with_stored_upload(
            lambda stored: self.exchange.release_feedback(
                self.user,
                self.course_id,
                self.assignment_id,
                self.notebook_id,
                self.student_id,
                self.timestamp,
                self.checksum,
                stored,
                self.key,
                self.decided,
            )
        )
        self.answer(
            {"note": "Feedback released", "position": written.event.position}, status=200 if written.duplicate else 201
        )


default_handlers = [(r"feedback", FeedbackHandler)]
