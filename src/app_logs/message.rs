//! The few Loggregator v2 messages the agent sends, written from loggregator-api's
//! `v2/envelope.proto` and `v2/ingress.proto` (field numbers and names as there): an envelope
//! carrying a log line, a batch of them, and the `Ingress.Send` call's empty answer.

use std::collections::HashMap;

/// `loggregator.v2.Envelope` (only the `log` member of its `message` oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    #[prost(int64, tag = "1")]
    pub timestamp: i64,
    #[prost(string, tag = "2")]
    pub source_id: String,
    #[prost(string, tag = "8")]
    pub instance_id: String,
    #[prost(map = "string, string", tag = "9")]
    pub tags: HashMap<String, String>,
    #[prost(oneof = "Message", tags = "4")]
    pub message: Option<Message>,
}

/// The `message` oneof of an envelope.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Message {
    #[prost(message, tag = "4")]
    Log(Log),
}

/// `loggregator.v2.Log`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Log {
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
    #[prost(enumeration = "LogType", tag = "2")]
    pub r#type: i32,
}

/// `loggregator.v2.Log.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LogType {
    Out = 0,
    Err = 1,
}

/// `loggregator.v2.EnvelopeBatch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvelopeBatch {
    #[prost(message, repeated, tag = "1")]
    pub batch: Vec<Envelope>,
}

/// `loggregator.v2.SendResponse`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct SendResponse {}

/// The gRPC method a batch is sent with.
pub const SEND_PATH: &str = "/loggregator.v2.Ingress/Send";
