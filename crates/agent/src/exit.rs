//! The exit status of every command, in one place (the table is in docs/operations.md).

use std::process::ExitCode;

/// Why a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success; the agent stopped cleanly after SIGTERM/SIGINT.
    Success = 0,
    /// An event, a retry or a fixture failed; a mail was dead-lettered in the round of
    /// `run --once`; a thing asked for does not exist.
    Failed = 1,
    /// The config or a rule is broken (every problem is listed); the command line is wrong
    /// (an unknown option, value or resource); an erasure was refused; an operator command
    /// named a work item, identity, account or resource that does not exist, or asked what
    /// cannot apply.
    Config = 2,
    /// A resource could not be synchronized (unreadable feed, unreachable server, halted
    /// batch, repository error), or another agent holds the repository.
    Resource = 3,
    /// A second SIGTERM/SIGINT ended the agent without waiting for the part in hand.
    SecondSignal = 130,
}

impl Exit {
    /// The numeric status.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_the_documented_ones() {
        let codes: Vec<u8> = [
            Exit::Success,
            Exit::Failed,
            Exit::Config,
            Exit::Resource,
            Exit::SecondSignal,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 130]);
    }
}
