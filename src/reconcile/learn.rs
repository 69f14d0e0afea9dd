//! Hostname rules in the loop: the DNS filter's learn requests, served ahead of passes, between
//! a pass's steps and while a pass waits for the store, because the loop owns the one socket
//! that may write the owned table. A request is: take the waiting ones as a batch, refuse
//! those whose rule the kernel does not hold yet, write the rest, reply, publish.

use tokio::sync::oneshot;

use super::Reconciler;
use crate::dataplane::LearnOutcome;
use crate::dataplane::learned::{Bound, Learn};
use crate::dns::{LearnReply, LearnRequest};

/// Learn batches served between two steps of a pass at most: a flood of answers cannot hold a
/// pass (a staging container's exemption) for long; the rest wait for the next step.
const LEARN_BATCHES_BETWEEN_STEPS: usize = 4;

/// Learn requests written in one batch at most (the rest wait for the next).
pub const LEARN_BATCH: usize = 64;

impl Reconciler {
    /// Reads back what the persistent table learned before this start (hostname rules), so
    /// that the first pass puts it into the owned table too; a restart breaks no connection
    /// and no cached answer.
    pub async fn restore_learned(&mut self) {
        match self.dataplane.restore_learned().await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "learned addresses read back from the kernel"),
            // No table yet (a first start), or unreadable: nothing learned is kept.
            Err(err) => tracing::debug!(error = %err, "no learned addresses read back"),
        }
    }

    /// Allows what hostname rules' answers gave containers: `first` and whatever else is
    /// waiting (at most [`LEARN_BATCH`] in all), in one batch, and answers each request. Only
    /// for rules the kernel holds.
    pub async fn learn(&mut self, first: LearnRequest) {
        let requests = self.take_waiting(first);
        let learnable = self.refuse_unheld(requests);
        if learnable.is_empty() {
            return;
        }
        let (items, replies): (Vec<Learn>, Vec<_>) = learnable.into_iter().unzip();
        let outcomes = self.dataplane.learn(&items).await;
        self.publish_learned();
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome.map(learn_reply));
        }
    }

    /// `first` and the requests waiting behind it, [`LEARN_BATCH`] at most.
    fn take_waiting(&mut self, first: LearnRequest) -> Vec<LearnRequest> {
        let mut requests = vec![first];
        if let Some(waiting) = &mut self.learns {
            while requests.len() < LEARN_BATCH {
                match waiting.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
        }
        requests
    }

    /// Answers the requests whose rule the kernel does not hold (yet: a reload's pass has not
    /// written it) with an error, and returns the others, each with where its reply goes.
    fn refuse_unheld(
        &self,
        requests: Vec<LearnRequest>,
    ) -> Vec<(Learn, oneshot::Sender<Result<LearnReply, String>>)> {
        let held = self
            .last_written
            .as_ref()
            .and_then(Option::as_ref)
            .map(|rules| rules.rule_set.mark_set())
            .unwrap_or_default();
        let mut learnable = Vec::with_capacity(requests.len());
        for request in requests {
            if held.contains(&request.mark) {
                let learn = Learn {
                    ifindex: request.ifindex,
                    mark: request.mark,
                    addresses: request.addresses,
                    timeout: request.timeout,
                };
                learnable.push((learn, request.reply));
            } else {
                let _ = request.reply.send(Err(format!(
                    "the kernel does not hold the rule of mark {:#05x} (yet)",
                    request.mark
                )));
            }
        }
        learnable
    }

    /// What hostname rules allow now, into the metrics and `/status`.
    pub(super) fn publish_learned(&self) {
        self.metrics.set_learned(self.dataplane.learned_count());
        let per_mark = self.dataplane.learned_per_mark();
        self.status
            .update(|status| status.learned_per_mark = per_mark);
    }

    /// The next learn request; never, without a DNS filter (or once it is gone).
    pub async fn next_learn(&mut self) -> Option<LearnRequest> {
        let Some(learns) = &mut self.learns else {
            return std::future::pending().await;
        };
        match learns.recv().await {
            Some(request) => Some(request),
            None => {
                self.learns = None;
                std::future::pending().await
            }
        }
    }

    /// Serves the learn requests waiting now (a pass calls it between its steps, so that an
    /// answer waits for at most one step, not a whole pass).
    pub(super) async fn serve_waiting_learns(&mut self) {
        for _ in 0..LEARN_BATCHES_BETWEEN_STEPS {
            let Some(first) = self.learns.as_mut().and_then(|l| l.try_recv().ok()) else {
                return;
            };
            self.learn(first).await;
        }
    }

    /// Awaits `work`, which does not need the reconciler, serving learn requests meanwhile.
    pub(super) async fn serving_learns<F: std::future::Future>(&mut self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                Some(request) = self.next_learn() => self.learn(request).await,
            }
        }
    }
}

/// The filter's reply for what the kernel allowed of one request, and what bounds left out.
fn learn_reply(outcome: LearnOutcome) -> LearnReply {
    let mut reply = LearnReply {
        allowed: outcome.allowed,
        ..Default::default()
    };
    for (_, bound) in outcome.refused {
        match bound {
            Bound::Container => reply.refused_container += 1,
            Bound::Total => reply.refused_total += 1,
        }
    }
    reply
}
