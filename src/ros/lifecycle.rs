//! Managed (lifecycle) nodes on `lifecycle_msgs`, as rclcpp_lifecycle serves them, so `ros2
//! lifecycle` and nav2's `lifecycle_manager` can drive our nodes: `~/change_state`,
//! `~/get_state`, `~/get_available_states`, `~/get_available_transitions`,
//! `~/get_transition_graph` and `~/transition_event`.
//!
//! r2r has no lifecycle support, so the state machine (ROS 2's default one, without the error
//! branch: a failing callback returns to the state it started from) lives here once. The node
//! body carries out each transition ([`Pending`]); this module owns the states, the services and
//! the events.

use super::runtime::NodeHandle;
use futures::{Stream, StreamExt};
use r2r::lifecycle_msgs::msg::{
    State, Transition as TransitionMsg, TransitionDescription, TransitionEvent,
};
use r2r::lifecycle_msgs::srv::{
    ChangeState, GetAvailableStates, GetAvailableTransitions, GetState,
};
use r2r::ServiceRequest;
use std::collections::VecDeque;
use tracing::{info, warn};

/// `lifecycle_msgs/State` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StateId {
    Unconfigured = 1,
    Inactive = 2,
    Active = 3,
    Finalized = 4,
    Configuring = 10,
    CleaningUp = 11,
    ShuttingDown = 12,
    Activating = 13,
    Deactivating = 14,
}

impl StateId {
    const ALL: [StateId; 9] = [
        Self::Unconfigured,
        Self::Inactive,
        Self::Active,
        Self::Finalized,
        Self::Configuring,
        Self::CleaningUp,
        Self::ShuttingDown,
        Self::Activating,
        Self::Deactivating,
    ];

    /// The labels rcl_lifecycle uses (what `ros2 lifecycle get` prints).
    pub fn label(self) -> &'static str {
        match self {
            Self::Unconfigured => "unconfigured",
            Self::Inactive => "inactive",
            Self::Active => "active",
            Self::Finalized => "finalized",
            Self::Configuring => "configuring",
            Self::CleaningUp => "cleaningup",
            Self::ShuttingDown => "shuttingdown",
            Self::Activating => "activating",
            Self::Deactivating => "deactivating",
        }
    }

    fn msg(self) -> State {
        State {
            id: self as u8,
            label: self.label().into(),
        }
    }
}

/// The transitions a client can request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Configure,
    Cleanup,
    Activate,
    Deactivate,
    Shutdown,
}

impl Transition {
    pub fn label(self) -> &'static str {
        match self {
            Self::Configure => "configure",
            Self::Cleanup => "cleanup",
            Self::Activate => "activate",
            Self::Deactivate => "deactivate",
            Self::Shutdown => "shutdown",
        }
    }

    /// `lifecycle_msgs/Transition` id when requested from `from` (shutdown has one per state),
    /// the transition state it passes through, and where success and failure lead.
    fn edge(self, from: StateId) -> Option<(u8, StateId, StateId)> {
        use StateId::*;
        let (id, via, to) = match (self, from) {
            (Self::Configure, Unconfigured) => (1, Configuring, Inactive),
            (Self::Cleanup, Inactive) => (2, CleaningUp, Unconfigured),
            (Self::Activate, Inactive) => (3, Activating, Active),
            (Self::Deactivate, Active) => (4, Deactivating, Inactive),
            (Self::Shutdown, Unconfigured) => (5, ShuttingDown, Finalized),
            (Self::Shutdown, Inactive) => (6, ShuttingDown, Finalized),
            (Self::Shutdown, Active) => (7, ShuttingDown, Finalized),
            _ => return None,
        };
        Some((id, via, to))
    }

    /// Transition result ids (`TRANSITION_ON_<X>_SUCCESS` / `_FAILURE`).
    fn result_id(self, ok: bool) -> u8 {
        let base = match self {
            Self::Configure => 10,
            Self::Cleanup => 20,
            Self::Activate => 30,
            Self::Deactivate => 40,
            Self::Shutdown => 50,
        };
        base + u8::from(!ok)
    }

    const ALL: [Transition; 5] = [
        Self::Configure,
        Self::Cleanup,
        Self::Activate,
        Self::Deactivate,
        Self::Shutdown,
    ];

    /// A `ChangeState` request: by id, or by label when the id is 0 (as rclcpp accepts).
    fn from_request(msg: &TransitionMsg, from: StateId) -> Option<Self> {
        Self::ALL.into_iter().find(|t| {
            t.edge(from).is_some_and(|(id, _, _)| {
                if msg.id == 0 {
                    msg.label == t.label()
                } else {
                    msg.id == id
                }
            })
        })
    }

    fn available(from: StateId) -> impl Iterator<Item = (Self, u8, StateId)> {
        Self::ALL
            .into_iter()
            .filter_map(move |t| t.edge(from).map(|(id, via, _)| (t, id, via)))
    }
}

/// A transition the node body must carry out now; hand it back with [`Lifecycle::finish`].
pub struct Pending {
    pub transition: Transition,
    from: StateId,
    request: Option<ServiceRequest<ChangeState::Service>>,
}

/// The lifecycle services of one node. The body polls [`Lifecycle::next`] in its event loop:
/// queries are answered there, and each valid transition comes back as a [`Pending`] that the
/// body carries out and returns with [`Lifecycle::finish`]. Polled by the body rather than
/// spawned, so a transition runs on the body's own state without locks.
pub struct Lifecycle {
    state: StateId,
    change: Box<dyn Stream<Item = ServiceRequest<ChangeState::Service>> + Unpin + Send>,
    get: Box<dyn Stream<Item = ServiceRequest<GetState::Service>> + Unpin + Send>,
    states: Box<dyn Stream<Item = ServiceRequest<GetAvailableStates::Service>> + Unpin + Send>,
    available:
        Box<dyn Stream<Item = ServiceRequest<GetAvailableTransitions::Service>> + Unpin + Send>,
    graph: Box<dyn Stream<Item = ServiceRequest<GetAvailableTransitions::Service>> + Unpin + Send>,
    events: r2r::Publisher<TransitionEvent>,
    /// Transitions `autostart` still has to walk.
    autostart: VecDeque<Transition>,
}

/// Creates the lifecycle services of `h`'s node; with `autostart` the first [`Lifecycle::next`]
/// calls walk the node through configure and activate (a failure stops the walk there).
pub fn start<P: Clone>(h: &NodeHandle<P>, autostart: bool) -> anyhow::Result<Lifecycle> {
    let qos = r2r::QosProfile::services_default;
    let mut node = h.node();
    Ok(Lifecycle {
        state: StateId::Unconfigured,
        change: Box::new(node.create_service::<ChangeState::Service>("~/change_state", qos())?),
        get: Box::new(node.create_service::<GetState::Service>("~/get_state", qos())?),
        states: Box::new(
            node.create_service::<GetAvailableStates::Service>("~/get_available_states", qos())?,
        ),
        available: Box::new(node.create_service::<GetAvailableTransitions::Service>(
            "~/get_available_transitions",
            qos(),
        )?),
        graph: Box::new(
            node.create_service::<GetAvailableTransitions::Service>(
                "~/get_transition_graph",
                qos(),
            )?,
        ),
        events: node.create_publisher::<TransitionEvent>(
            "~/transition_event",
            r2r::QosProfile::default(),
        )?,
        autostart: if autostart {
            VecDeque::from([Transition::Configure, Transition::Activate])
        } else {
            VecDeque::new()
        },
    })
}

impl Lifecycle {
    pub fn state(&self) -> StateId {
        self.state
    }

    /// Answers queries until a transition is due; it has then entered its transition state.
    pub async fn next(&mut self) -> Pending {
        if let Some(t) = self.autostart.pop_front() {
            if let Some(p) = self.begin(t, None) {
                return p;
            }
            self.autostart.clear();
        }
        loop {
            let current = self.state;
            let sent = tokio::select! {
                Some(req) = self.change.next() => {
                    match Transition::from_request(&req.message.transition, current) {
                        Some(t) => {
                            if let Some(p) = self.begin(t, Some(req)) {
                                return p;
                            }
                            continue;
                        }
                        None => {
                            warn!(
                                "lifecycle: transition {} `{}` is not available in state {}",
                                req.message.transition.id, req.message.transition.label, current.label()
                            );
                            req.respond(ChangeState::Response { success: false })
                        }
                    }
                }
                Some(req) = self.get.next() => req.respond(GetState::Response { current_state: current.msg() }),
                Some(req) = self.states.next() => req.respond(GetAvailableStates::Response {
                    available_states: StateId::ALL.iter().map(|s| s.msg()).collect(),
                }),
                Some(req) = self.available.next() => req.respond(GetAvailableTransitions::Response {
                    available_transitions: descriptions(&[current]),
                }),
                Some(req) = self.graph.next() => req.respond(GetAvailableTransitions::Response {
                    available_transitions: descriptions(&StateId::ALL),
                }),
                else => std::future::pending().await,
            };
            if let Err(e) = sent {
                warn!("lifecycle: cannot answer a request: {e}");
            }
        }
    }

    fn begin(
        &mut self,
        t: Transition,
        request: Option<ServiceRequest<ChangeState::Service>>,
    ) -> Option<Pending> {
        let from = self.state;
        let (id, via, _) = t.edge(from)?;
        self.enter(
            TransitionMsg {
                id,
                label: t.label().into(),
            },
            via,
        );
        Some(Pending {
            transition: t,
            from,
            request,
        })
    }

    /// Ends a transition the body carried out: `Err(reason)` returns to the state it started
    /// from (shutdown ends finalized either way).
    pub fn finish(&mut self, p: Pending, result: Result<(), String>) {
        let ok = result.is_ok();
        let to = p.transition.edge(p.from).map_or(p.from, |(_, _, to)| to);
        let end = if ok || p.transition == Transition::Shutdown {
            to
        } else {
            p.from
        };
        let label = if ok {
            "transition_success"
        } else {
            "transition_failure"
        };
        self.enter(
            TransitionMsg {
                id: p.transition.result_id(ok),
                label: label.into(),
            },
            end,
        );
        match &result {
            Ok(()) => info!("lifecycle: {} -> {}", p.from.label(), end.label()),
            Err(e) => {
                warn!(
                    "lifecycle: `{}` failed, now {}: {e}",
                    p.transition.label(),
                    end.label()
                );
                self.autostart.clear();
            }
        }
        if let Some(req) = p.request {
            if let Err(e) = req.respond(ChangeState::Response { success: ok }) {
                warn!("lifecycle: cannot answer change_state: {e}");
            }
        }
    }

    fn enter(&mut self, transition: TransitionMsg, to: StateId) {
        let from = std::mem::replace(&mut self.state, to);
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let event = TransitionEvent {
            timestamp,
            transition,
            start_state: from.msg(),
            goal_state: to.msg(),
        };
        if let Err(e) = self.events.publish(&event) {
            warn!("lifecycle: cannot publish transition_event: {e}");
        }
    }
}

fn descriptions(states: &[StateId]) -> Vec<TransitionDescription> {
    states
        .iter()
        .flat_map(|&from| {
            Transition::available(from).map(move |(t, id, via)| TransitionDescription {
                transition: TransitionMsg {
                    id,
                    label: t.label().into(),
                },
                start_state: from.msg(),
                goal_state: via.msg(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u8, label: &str) -> TransitionMsg {
        TransitionMsg {
            id,
            label: label.into(),
        }
    }

    #[test]
    fn transitions_follow_the_default_state_machine() {
        use StateId::*;
        assert_eq!(
            Transition::from_request(&req(1, ""), Unconfigured),
            Some(Transition::Configure)
        );
        assert_eq!(
            Transition::from_request(&req(0, "activate"), Inactive),
            Some(Transition::Activate)
        );
        assert_eq!(
            Transition::from_request(&req(3, "activate"), Unconfigured),
            None
        );
        assert_eq!(
            Transition::from_request(&req(7, ""), Active),
            Some(Transition::Shutdown)
        );
        assert_eq!(
            Transition::from_request(&req(7, ""), Inactive),
            None,
            "7 is active_shutdown"
        );
        let from_inactive: Vec<_> = Transition::available(Inactive)
            .map(|(t, id, _)| (t.label(), id))
            .collect();
        assert_eq!(
            from_inactive,
            [("cleanup", 2), ("activate", 3), ("shutdown", 6)]
        );
        assert_eq!(Transition::available(Finalized).count(), 0);
        assert_eq!(Transition::Deactivate.result_id(false), 41);
        // The graph lists every edge once: 7 of them.
        assert_eq!(descriptions(&StateId::ALL).len(), 7);
    }
}
