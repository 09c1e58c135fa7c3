"""The exceptions Surveyor raises on purpose, in one tree.

    SurveyorError
    ├── PipelineError      a pipeline file is wrong (names the file, the key, what is expected)
    ├── MessageError       a command or reply that does not follow the schema
    │   └── UnknownCommand a well-formed request whose `cmd` this service does not serve
    ├── FrameError         a data message that cannot be a frame (parts, sizes, header)
    ├── ParameterError     a stage parameter value that is refused (the old value stays)
    ├── AccessRefused      a command the sender may not send to this port (changes go through the handler)
    └── ProcessingError    a Processing class that cannot be loaded or run as written, or broke the contract

At a port every one of them becomes an `ok: false` reply or a counted rejection, never a crash.
The `type` of such a reply is the class name, so front-ends can tell them apart.
"""


class SurveyorError(Exception):
    """Base of every error Surveyor raises deliberately."""


class PipelineError(SurveyorError):
    """A pipeline file that cannot be used as written."""


class MessageError(SurveyorError):
    """A control message that does not follow the schema."""


class UnknownCommand(MessageError):
    """A request for a command the receiving service does not serve."""


class FrameError(SurveyorError):
    """A data message that is not a valid frame."""


class ParameterError(SurveyorError):
    """A refused parameter value; the value in force does not change."""


class AccessRefused(SurveyorError):
    """A command this port takes only from its handler or an operator's key."""


class ProcessingError(SurveyorError):
    """A Processing class that cannot be loaded or run as written, or one that broke the contract."""
