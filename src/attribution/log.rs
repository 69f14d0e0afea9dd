//! The log events of attribution: one per new row (paced), one summary line per period.

use super::{
    attempt::Action,
    state::{PeriodSummary, SUMMARY_PERIOD},
    summary::Attempt,
};

/// Writes the log event for a new row: one structured event with the fields of `/blocked`
/// (`dst_port` absent when the protocol has none).
pub fn log_new(attempt: &Attempt) {
    let message = match attempt.action {
        Action::Rejected => "rejected egress attempt",
        Action::WouldReject => "egress attempt that enforce would reject (audit mode)",
    };
    macro_rules! event {
        ($($port:tt)*) => {
            tracing::warn!(
                target: "egress_guard::blocked",
                action = attempt.action.as_str(),
                handle = %attempt.handle,
                app_id = %attempt.app_id,
                space_id = %attempt.space_id,
                org_id = %attempt.org_id,
                workload = %attempt.workload,
                interface = %attempt.interface,
                src = %attempt.src,
                dst = %attempt.dst,
                protocol = %attempt.protocol,
                $($port)*
                first_seen = %attempt.first_seen,
                "{message}"
            )
        };
    }
    match attempt.dst_port {
        Some(port) => event!(dst_port = port,),
        None => event!(),
    }
}

/// Writes a period's summary line.
pub fn log_period(summary: &PeriodSummary) {
    let busiest = summary.busiest.as_ref();
    tracing::info!(
        target: "egress_guard::blocked",
        period_s = SUMMARY_PERIOD.as_secs(),
        packets = summary.packets,
        rows = summary.rows,
        new_rows_not_logged = summary.new_rows_unlogged,
        suppressed = summary.suppressed,
        socket_overruns = summary.overruns,
        busiest_app_id = busiest.map(|a| a.app_id.as_str()).unwrap_or(""),
        busiest_src = %busiest.map(|a| a.src.to_string()).unwrap_or_default(),
        busiest_dst = %busiest.map(|a| a.dst.to_string()).unwrap_or_default(),
        busiest_protocol = busiest.map(|a| a.protocol.as_str()).unwrap_or(""),
        busiest_dst_port = busiest.and_then(|a| a.dst_port).map(i64::from).unwrap_or(-1),
        busiest_count = busiest.map(|a| a.count).unwrap_or(0),
        "blocked attempts in the last period (see egress-guard blocked)"
    );
}
