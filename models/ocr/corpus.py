"""Word lists for synthetic document lines, per language. Lines are drawn from these with a seed, so
a set is reproducible; calibration and evaluation draw different lines (see render.py)."""

from __future__ import annotations

import random

WORDS: dict[str, list[str]] = {
    "en": ("invoice total amount due date order number customer address delivery payment received "
           "account balance shipping weight quantity price tax report summary quarterly revenue "
           "warehouse label product model serial contract signed page section figure table").split(),
    "fr": ("facture montant total échéance numéro client adresse livraison paiement reçu solde "
           "expédition poids quantité prix taxe rapport résumé trimestriel entrepôt étiquette "
           "produit modèle série contrat signé français élève garçon à été très déjà").split(),
    "es": ("factura importe total vencimiento número cliente dirección entrega pago recibido saldo "
           "envío peso cantidad precio impuesto informe resumen trimestral almacén etiqueta "
           "producto modelo serie contrato firmado año niño señal también según").split(),
    "de": ("Rechnung Betrag gesamt Fälligkeit Nummer Kunde Adresse Lieferung Zahlung erhalten "
           "Kontostand Versand Gewicht Menge Preis Steuer Bericht Übersicht Quartal Lager "
           "Etikett Produkt Modell Vertrag unterschrieben Straße größer für über Grüße").split(),
    "ru": ("счёт сумма итого срок номер клиент адрес доставка оплата получено баланс отправка "
           "вес количество цена налог отчёт сводка квартал склад этикетка товар модель серия "
           "договор подписан страница раздел таблица русский язык").split(),
    "zh": ("发票 总金额 到期日 订单号 客户 地址 送货 付款 已收到 账户 余额 运输 重量 数量 价格 税 "
           "报告 摘要 季度 收入 仓库 标签 产品 型号 序列号 合同 签字 页面 表格 中文 学习 北京").split(),
    "ja": ("請求書 合計金額 支払期日 注文番号 お客様 住所 配達 お支払い 受領 残高 発送 重さ "
           "数量 価格 税金 報告書 まとめ 四半期 売上 倉庫 ラベル 製品 モデル 契約 署名 ページ "
           "ひらがな カタカナ ありがとう ございます").split(),
    "ko": ("청구서 총금액 지급기일 주문번호 고객 주소 배송 결제 수령 잔액 발송 무게 수량 가격 "
           "세금 보고서 요약 분기 매출 창고 라벨 제품 모델 계약 서명 페이지 표 한국어 감사합니다").split(),
}

NO_SPACES = {"zh", "ja"}


def make_line(lang: str, rng: random.Random) -> str:
    words = rng.sample(WORDS[lang], rng.randint(2, 4))
    if rng.random() < 0.4:
        words.insert(rng.randrange(len(words) + 1), str(rng.randint(1, 99999)))
    return ("" if lang in NO_SPACES else " ").join(words)
