//! The server's kinds of client (`getClientType`), as `TYPE` filters, exemptions and rules see
//! them.

use crate::policy::client_list::ListedClient;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientType {
    Normal,
    Master,
    Replica,
    PubSub,
}

impl ClientType {
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "normal" => Some(Self::Normal),
            "master" | "primary" => Some(Self::Master),
            "replica" | "slave" => Some(Self::Replica),
            "pubsub" => Some(Self::PubSub),
            _ => None,
        }
    }

    /// The server's `getClientType`: a MONITOR client (flag `O`) is normal, not a replica.
    pub fn of(client: &ListedClient) -> Self {
        if client.has_flag('M') {
            Self::Master
        } else if client.has_flag('S') {
            Self::Replica
        } else if client.has_flag('P') {
            Self::PubSub
        } else {
            Self::Normal
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Master => "master",
            Self::Replica => "replica",
            Self::PubSub => "pubsub",
        }
    }
}
