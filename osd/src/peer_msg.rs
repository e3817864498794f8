//! Typed OSD-to-OSD messages: the envelope every peering and replication request carries
//! ([`PeerHeader`]), and the sub-op ([`SubOp`]) with its write's version, request id and
//! transaction said explicitly.
//!
//! The wire form is `basalt_proto::osd` (`PeerHeader`, `SubOpRequest`, ...); this module is
//! the one place that turns it into typed values and back, so a handler gets a `PeerHeader`
//! it can trust (version checked) and a sub-op whose transaction agrees with its envelope,
//! never a field it must look for. Pure: no IO.

use basalt_maps::Epoch;
use basalt_ops::{decode, encode, Eversion, LogEntry, OpError, PeerMessageError, ReqId};
use basalt_placement::{OsdId, PgId};
use basalt_proto::osd as pb;

use crate::pg::ObjectName;
use crate::store::{Op, Transaction};

/// The version of the OSD-to-OSD messages this build speaks. Bump it when a peer message
/// changes meaning, so an OSD of another release refuses it with a typed error
/// ([`PeerMessageError::Version`]) instead of misreading it. Version 0 is the layout before
/// the envelope (no `header` field).
pub const PEER_MESSAGE_VERSION: u32 = 1;

/// Which PG a peer request is about, in which of its intervals, and from which OSD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHeader {
    pub pg: PgId,
    /// The epoch at which the sender's current interval for the PG began.
    pub interval_epoch: Epoch,
    pub from: OsdId,
}

impl PeerHeader {
    pub fn to_pb(self) -> pb::PeerHeader {
        pb::PeerHeader {
            version: PEER_MESSAGE_VERSION,
            pool: self.pg.pool,
            pg_seed: self.pg.seed,
            interval_epoch: self.interval_epoch,
            from: self.from,
        }
    }

    /// The typed header of a received request; refuses a missing envelope or another
    /// message version.
    pub fn from_pb(header: Option<&pb::PeerHeader>) -> Result<Self, PeerMessageError> {
        let h = header.ok_or(PeerMessageError::NoEnvelope {
            want: PEER_MESSAGE_VERSION,
        })?;
        if h.version != PEER_MESSAGE_VERSION {
            return Err(PeerMessageError::Version {
                have: h.version,
                want: PEER_MESSAGE_VERSION,
            });
        }
        Ok(PeerHeader {
            pg: PgId {
                pool: h.pool,
                seed: h.pg_seed,
            },
            interval_epoch: h.interval_epoch,
            from: h.from,
        })
    }
}

/// [`PeerHeader::from_pb`] as the error a peer request's reply carries.
pub fn header_of(header: Option<&pb::PeerHeader>) -> Result<PeerHeader, OpError> {
    PeerHeader::from_pb(header).map_err(OpError::BadPeerMessage)
}

/// A primary's write to a replica.
#[derive(Clone, Debug)]
pub struct SubOp {
    pub header: PeerHeader,
    /// The write's version: its PG log entry's, assigned by the primary.
    pub version: Eversion,
    /// The client request the write answers.
    pub reqid: ReqId,
    pub object: ObjectName,
    /// Log seq of the newest earlier write to the same object still in flight when this one
    /// was sent: the replica applies this one only after that one's log entry.
    pub after_seq: Option<u64>,
    pub txn: Transaction,
}

impl SubOp {
    pub fn to_pb(&self) -> pb::SubOpRequest {
        pb::SubOpRequest {
            header: Some(self.header.to_pb()),
            version: Some(pb::Eversion {
                epoch: self.version.epoch,
                seq: self.version.seq,
            }),
            reqid: Some(pb::ReqId {
                client: self.reqid.client.clone(),
                incarnation: self.reqid.incarnation,
                tid: self.reqid.tid,
            }),
            txn: encode(&self.txn),
            namespace: self.object.0.clone(),
            object: self.object.1.clone(),
            after_seq: self.after_seq.unwrap_or(0),
        }
    }

    /// The typed sub-op of a received request: envelope version checked, transaction decoded
    /// and checked against the envelope ([`SubOp::check_log_entry`]).
    pub fn from_pb(req: pb::SubOpRequest) -> Result<Self, OpError> {
        let header = header_of(req.header.as_ref())?;
        let missing =
            |what: &str| OpError::BadPeerMessage(PeerMessageError::MissingField(what.into()));
        let version = req.version.ok_or_else(|| missing("version"))?;
        let reqid = req.reqid.ok_or_else(|| missing("request id"))?;
        let txn: Transaction = decode(&req.txn, "sub-op transaction")?;
        let sub_op = SubOp {
            header,
            version: Eversion {
                epoch: version.epoch,
                seq: version.seq,
            },
            reqid: ReqId {
                client: reqid.client,
                incarnation: reqid.incarnation,
                tid: reqid.tid,
            },
            object: (req.namespace, req.object),
            after_seq: (req.after_seq != 0).then_some(req.after_seq),
            txn,
        };
        sub_op.check_log_entry().map_err(OpError::BadPeerMessage)?;
        Ok(sub_op)
    }

    /// Checks that the transaction writes exactly one log entry for the envelope's PG and that
    /// it records this sub-op's version (in this interval), request id and object: the replica
    /// dedups resends and orders writes by the envelope, so the two must never disagree.
    pub fn check_log_entry(&self) -> Result<(), PeerMessageError> {
        let pg = self.header.pg;
        let appends: Vec<(u64, &bytes::Bytes)> = self
            .txn
            .ops()
            .iter()
            .filter_map(|op| match op {
                Op::PgLogAppend {
                    pg: p,
                    version,
                    entry,
                } if *p == pg => Some((*version, entry)),
                _ => None,
            })
            .collect();
        let [(seq, entry)] = appends[..] else {
            return Err(PeerMessageError::LogEntries {
                pg: pg.to_string(),
                count: appends.len(),
            });
        };
        let mismatch = |field: &str, envelope: String, logged: String| {
            Err(PeerMessageError::LogEntryMismatch {
                field: field.into(),
                envelope,
                logged,
            })
        };
        if self.version.epoch != self.header.interval_epoch {
            return mismatch(
                "interval epoch",
                self.header.interval_epoch.to_string(),
                format!("version {}", self.version),
            );
        }
        if seq != self.version.seq {
            return mismatch("log seq", self.version.seq.to_string(), seq.to_string());
        }
        let logged: LogEntry = match decode(entry, "log entry") {
            Ok(e) => e,
            Err(e) => return mismatch("log entry", self.version.to_string(), e.to_string()),
        };
        if logged.version != self.version {
            return mismatch(
                "version",
                self.version.to_string(),
                logged.version.to_string(),
            );
        }
        if logged.reqid != self.reqid {
            return mismatch(
                "request id",
                self.reqid.to_string(),
                logged.reqid.to_string(),
            );
        }
        if (&logged.namespace, &logged.object) != (&self.object.0, &self.object.1) {
            return mismatch(
                "object",
                format!("{}/{}", self.object.0, self.object.1),
                format!("{}/{}", logged.namespace, logged.object),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectId;

    fn pg() -> PgId {
        PgId { pool: 1, seed: 3 }
    }

    fn reqid(tid: u64) -> ReqId {
        ReqId {
            client: "client.a".into(),
            incarnation: 7,
            tid,
        }
    }

    /// A sub-op built the way the primary builds one (`pg::finish_write`).
    fn sub_op(version: Eversion) -> SubOp {
        let obj = ObjectId::with_namespace(pg(), String::new(), "obj".to_string());
        let mut txn = Transaction::new();
        crate::pg::finish_write(
            &mut txn,
            &obj,
            true,
            false,
            version,
            &reqid(9),
            bytes::Bytes::new(),
            0,
            100,
        );
        SubOp {
            header: PeerHeader {
                pg: pg(),
                interval_epoch: version.epoch,
                from: 2,
            },
            version,
            reqid: reqid(9),
            object: (String::new(), "obj".into()),
            after_seq: Some(4),
            txn,
        }
    }

    #[test]
    fn a_sub_op_round_trips_through_the_wire_form() {
        let s = sub_op(Eversion { epoch: 5, seq: 6 });
        let back = SubOp::from_pb(s.to_pb()).unwrap();
        assert_eq!(back.header, s.header);
        assert_eq!(back.version, s.version);
        assert_eq!(back.reqid, s.reqid);
        assert_eq!(back.object, s.object);
        assert_eq!(back.after_seq, Some(4));
        assert_eq!(back.txn.ops().len(), s.txn.ops().len());
    }

    #[test]
    fn an_envelope_that_disagrees_with_its_log_entry_is_refused() {
        let good = sub_op(Eversion { epoch: 5, seq: 6 });
        assert_eq!(good.check_log_entry(), Ok(()));
        let field_of = |s: &SubOp| match s.check_log_entry() {
            Err(PeerMessageError::LogEntryMismatch { field, .. }) => field,
            other => panic!("expected a mismatch, got {other:?}"),
        };

        let mut s = good.clone();
        s.version.seq = 7;
        assert_eq!(field_of(&s), "log seq");

        let mut s = good.clone();
        s.reqid = reqid(10);
        assert_eq!(field_of(&s), "request id");

        let mut s = good.clone();
        s.object.1 = "other".into();
        assert_eq!(field_of(&s), "object");

        let mut s = good.clone();
        s.header.interval_epoch = 4;
        assert_eq!(field_of(&s), "interval epoch");

        // A version of another interval with the same seq: the log entry says otherwise.
        let mut s = sub_op(Eversion { epoch: 4, seq: 6 });
        s.version.epoch = 5;
        s.header.interval_epoch = 5;
        assert_eq!(field_of(&s), "version");
    }

    #[test]
    fn a_sub_op_without_exactly_one_log_entry_is_refused() {
        let mut s = sub_op(Eversion { epoch: 5, seq: 6 });
        s.txn = Transaction::new();
        assert_eq!(
            s.check_log_entry(),
            Err(PeerMessageError::LogEntries {
                pg: pg().to_string(),
                count: 0
            })
        );
        // The receiver sees the same as a typed error in the reply.
        let e = SubOp::from_pb(s.to_pb()).unwrap_err();
        assert!(matches!(
            e,
            OpError::BadPeerMessage(PeerMessageError::LogEntries { count: 0, .. })
        ));
    }

    #[test]
    fn another_message_version_or_none_is_a_typed_refusal() {
        let mut wire = sub_op(Eversion { epoch: 5, seq: 6 }).to_pb();
        wire.header.as_mut().unwrap().version = PEER_MESSAGE_VERSION + 1;
        assert_eq!(
            SubOp::from_pb(wire.clone()).unwrap_err(),
            OpError::BadPeerMessage(PeerMessageError::Version {
                have: PEER_MESSAGE_VERSION + 1,
                want: PEER_MESSAGE_VERSION
            })
        );
        wire.header = None;
        assert_eq!(
            SubOp::from_pb(wire).unwrap_err(),
            OpError::BadPeerMessage(PeerMessageError::NoEnvelope {
                want: PEER_MESSAGE_VERSION
            })
        );
        wire = sub_op(Eversion { epoch: 5, seq: 6 }).to_pb();
        wire.reqid = None;
        assert!(matches!(
            SubOp::from_pb(wire).unwrap_err(),
            OpError::BadPeerMessage(PeerMessageError::MissingField(_))
        ));
    }

    #[test]
    fn a_request_of_the_layout_before_the_envelope_decodes_to_a_typed_refusal() {
        // Version 0 put pool, pg_seed, interval_epoch and from in fields 1-4, now reserved: a
        // receiver decodes it (unknown fields are skipped) and finds no envelope.
        use prost::Message;
        let mut bytes = Vec::new();
        prost::encoding::uint32::encode(1, &1, &mut bytes); // pool
        prost::encoding::uint32::encode(2, &3, &mut bytes); // pg_seed
        prost::encoding::uint64::encode(3, &5, &mut bytes); // interval_epoch
        prost::encoding::uint32::encode(4, &2, &mut bytes); // from
        let req = pb::PgQueryRequest::decode(&bytes[..]).unwrap();
        assert_eq!(
            header_of(req.header.as_ref()),
            Err(OpError::BadPeerMessage(PeerMessageError::NoEnvelope {
                want: PEER_MESSAGE_VERSION
            }))
        );
    }
}
